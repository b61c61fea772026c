"""The SparkSession a run uses, and which Delta engine that session can offer.

On Databricks (or under spark-submit) the session and its master already exist and are reused. A
local session runs its Python workers on this interpreter (the venv's), so the UDFs find pandas and
torch; it gets Delta's Spark extensions only when asked to use Spark's own Delta engine.
"""

from __future__ import annotations

import os
import sys

from depop_embed.config import Config

_DELTA_EXTENSION = "io.delta.sql.DeltaSparkSessionExtension"
_DELTA_CATALOG = "org.apache.spark.sql.delta.catalog.DeltaCatalog"


def get_spark(cfg: Config):
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    # pyspark takes the workers' interpreter from PYSPARK_PYTHON alone (spark.pyspark.python is read
    # by spark-submit); without it they run a system python3 that lacks pandas and torch.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = SparkSession.builder.appName(cfg.spark.app_name)
    # Under spark-submit the JVM is already up (its gateway port is in the environment) with the
    # master given on the command line; only a plain `python` run takes the master from config.
    if "PYSPARK_GATEWAY_PORT" not in os.environ:
        builder = builder.master(cfg.spark.master)
    settings = {
        "spark.pyspark.python": sys.executable,
        "spark.pyspark.driver.python": sys.executable,
        "spark.sql.session.timeZone": "UTC",
        "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.ui.showConsoleProgress": "false",
    }
    if cfg.output.engine == "spark":
        settings["spark.sql.extensions"] = _DELTA_EXTENSION
        settings["spark.sql.catalog.spark_catalog"] = _DELTA_CATALOG
    settings.update(cfg.spark.conf)
    for key, value in settings.items():
        builder = builder.config(key, value)
    return builder.getOrCreate()


def has_delta_connector(spark) -> bool:
    """True where Spark itself can write Delta: Databricks, or a session with Delta's extension."""
    if "DATABRICKS_RUNTIME_VERSION" in os.environ:
        return True
    return _DELTA_EXTENSION in (spark.conf.get("spark.sql.extensions", "") or "")


def resolve_engine(spark, cfg: Config) -> str:
    """The Delta engine a run writes with: 'spark' or 'delta-rs'."""
    available = has_delta_connector(spark)
    if cfg.output.engine == "spark" and not available:
        raise RuntimeError(
            "output.engine: spark was asked for but this session has no Delta connector; add the "
            "Delta jars (spark-submit --packages io.delta:delta-spark_2.13:<version>) or use delta-rs"
        )
    if cfg.output.engine == "delta-rs" or not available:
        if cfg.output.is_catalog:
            raise RuntimeError(
                f"output.location: {cfg.output.location} is a Unity Catalog schema, which needs "
                "Spark's Delta connector (Databricks); this session has none"
            )
        return "delta-rs"
    return "spark"
