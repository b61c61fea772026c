"""The SparkSession a run uses, and which Delta engine that session offers.

* On Databricks, or wherever a SparkContext already runs (a notebook, a caller's own session), that
  session is used as it is: nothing of the local `spark` config is pushed into it.
* Otherwise a local session is built. Its Python workers run this interpreter (the venv's), so the
  UDFs find pandas and torch. Unless `output.engine` is delta-rs, it loads Delta's Spark connector the
  standard way for the installed pyspark/delta-spark pair: the `io.delta` artifact in
  `spark.jars.packages`, resolved by Spark's own Ivy at session start into `spark.jars.ivy` (a cache,
  `~/.cache/depop-embed/ivy` unless `spark.conf` names another). Once resolved, the jars Spark resolved
  are recorded there and later sessions put them on `spark.jars` directly: fetched once, never again.
  Under spark-submit the JVM is already up, so the connector is whatever `--packages`/`--jars` gave it.

`resolve_engine` decides the engine from what the session can actually load, not from a setting:
`engine: auto` takes Spark's Delta when the connector's classes load and falls back to delta-rs with one
log line saying why; `engine: spark` without a loadable connector fails at start, naming the fix.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from depop_embed.config import Config

log = logging.getLogger(__name__)

DELTA_EXTENSION = "io.delta.sql.DeltaSparkSessionExtension"
DELTA_CATALOG = "org.apache.spark.sql.delta.catalog.DeltaCatalog"
DEFAULT_IVY = Path.home() / ".cache" / "depop-embed" / "ivy"
_RESOLVED_JARS = "depop-embed-delta-jars.json"  # under spark.jars.ivy: the package and the jars Spark resolved for it

# Why this process's session has no Delta connector, when get_spark knows (for resolve_engine's message).
_missing_connector: str | None = None


class DeltaConnectorMissing(RuntimeError):
    """output.engine: spark, but Delta's Spark connector cannot be loaded in this session."""


def delta_package() -> str:
    """The Maven coordinate of Delta's Spark connector for the installed pyspark and delta-spark, as
    delta-spark's own `configure_spark_with_delta_pip` names it (artifact per Spark minor version)."""
    import pyspark

    spark_minor = ".".join(pyspark.__version__.split(".")[:2])
    return f"io.delta:delta-spark_{spark_minor}_2.13:{version('delta-spark')}"


def get_spark(cfg: Config):
    from pyspark import SparkContext
    from pyspark.sql import SparkSession

    if on_databricks() or SparkContext._active_spark_context is not None:
        return SparkSession.builder.getOrCreate()
    # pyspark takes the workers' interpreter from PYSPARK_PYTHON alone (spark.pyspark.python is read
    # by spark-submit); without it they run a system python3 that lacks pandas and torch.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    settings = {
        "spark.pyspark.python": sys.executable,
        "spark.pyspark.driver.python": sys.executable,
        "spark.sql.session.timeZone": "UTC",
        "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.ui.showConsoleProgress": "false",
        "spark.jars.ivy": str(DEFAULT_IVY),
        **cfg.spark.conf,
    }
    if cfg.output.engine == "delta-rs":
        return _build(cfg, settings)
    jvm_running = "PYSPARK_GATEWAY_PORT" in os.environ  # spark-submit started the JVM with its own jars
    if jvm_running:
        delta = _DELTA_SESSION if _class_loadable(DELTA_EXTENSION) else None
        reason = "spark-submit was started without Delta's jars (add --packages " + _package_or_hint() + ")"
    else:
        delta, reason = _connector_settings(settings)
    if delta is None:
        return _without_connector(cfg, settings, reason)
    try:
        spark = _build(cfg, {**settings, **delta})
    except Exception as exc:  # the JVM did not start: Ivy could not resolve the package (offline, no repository)
        if jvm_running:
            raise
        return _without_connector(cfg, settings, f"Spark could not resolve {delta_package()} ({type(exc).__name__}; Ivy's report is above)")
    if not jvm_running:
        _record_resolved_jars(spark, settings["spark.jars.ivy"])
    return spark


_DELTA_SESSION = {"spark.sql.extensions": DELTA_EXTENSION, "spark.sql.catalog.spark_catalog": DELTA_CATALOG}


def _build(cfg: Config, settings: dict[str, str]):
    import os

    from pyspark.sql import SparkSession

    builder = SparkSession.builder.appName(cfg.spark.app_name)
    # Under spark-submit the JVM is already up (its gateway port is in the environment) with the
    # master given on the command line; only a plain `python` run takes the master from config.
    if "PYSPARK_GATEWAY_PORT" not in os.environ:
        builder = builder.master(cfg.spark.master)
    for key, value in settings.items():
        builder = builder.config(key, value)
    return builder.getOrCreate()


def _connector_settings(settings: dict[str, str]) -> tuple[dict[str, str] | None, str]:
    """The session settings that load Delta's connector: the jars resolved before, or the package for
    Spark to resolve; (None, why) when delta-spark is not installed."""
    try:
        package = delta_package()
    except PackageNotFoundError:
        return None, "the delta-spark package is not installed (pip install 'depop-embed[local]')"
    jars = _resolved_jars(settings["spark.jars.ivy"], package)
    if jars:
        extra = [j for j in settings.get("spark.jars", "").split(",") if j]
        return {**_DELTA_SESSION, "spark.jars": ",".join([*jars, *extra])}, ""
    packages = [p for p in settings.get("spark.jars.packages", "").split(",") if p]
    return {**_DELTA_SESSION, "spark.jars.packages": ",".join([package, *packages])}, ""


def _resolved_jars(ivy: str, package: str) -> list[str]:
    try:
        record = json.loads((Path(ivy).expanduser() / _RESOLVED_JARS).read_text())
    except (OSError, ValueError):
        return []
    jars = record.get("jars", []) if record.get("package") == package else []
    return jars if jars and all(Path(j.removeprefix("file:")).is_file() for j in jars) else []


def _record_resolved_jars(spark, ivy: str) -> None:
    """After Spark resolved the package: remember its jars, so later sessions need no resolution."""
    if not _class_loadable(DELTA_EXTENSION):
        return
    jars = [j for j in spark.sparkContext.getConf().get("spark.jars", "").split(",") if j]
    folder = Path(ivy).expanduser()
    record = {"package": delta_package(), "jars": [j for j in jars if Path(j.removeprefix("file:")).parent == folder / "jars"]}
    if record["jars"]:
        (folder / _RESOLVED_JARS).write_text(json.dumps(record, indent=1))


def _without_connector(cfg: Config, settings: dict[str, str], reason: str):
    global _missing_connector
    if cfg.output.engine == "spark" or cfg.output.is_catalog:
        raise DeltaConnectorMissing(_fix(reason))
    _missing_connector = reason
    return _build(cfg, settings)


def _fix(reason: str) -> str:
    return (
        f"output.engine: spark needs Delta's Spark connector, which this session cannot load: {reason}. "
        f"Make Maven Central reachable once (the jars are then cached under spark.jars.ivy), or run under "
        f"spark-submit --packages {_package_or_hint()}, or set output.engine: delta-rs"
    )


def _package_or_hint() -> str:
    try:
        return delta_package()
    except PackageNotFoundError:
        return "io.delta:delta-spark_<spark major.minor>_2.13:<delta version>"


def _class_loadable(name: str) -> bool:
    from pyspark import SparkContext

    SparkContext._ensure_initialized()  # the gateway of the running JVM
    return bool(SparkContext._jvm.org.apache.spark.util.Utils.classIsLoadable(name))


def on_databricks() -> bool:
    return "DATABRICKS_RUNTIME_VERSION" in os.environ


def has_delta_connector(spark) -> bool:
    """True where Spark itself can write Delta: Databricks, or a session whose Delta extension and
    catalog are configured and whose classes actually load."""
    if on_databricks():
        return True
    conf = spark.conf
    if DELTA_EXTENSION not in (conf.get("spark.sql.extensions", "") or "") or conf.get("spark.sql.catalog.spark_catalog", "") != DELTA_CATALOG:
        return False
    try:
        jvm = spark._jvm
    except Exception:  # Spark Connect: no JVM to ask; the server has what its configuration names
        return True
    return bool(jvm.org.apache.spark.util.Utils.classIsLoadable(DELTA_EXTENSION))


def resolve_engine(spark, cfg: Config) -> str:
    """The Delta engine a run writes with: 'spark' or 'delta-rs'."""
    if cfg.output.engine == "delta-rs":
        return "delta-rs"
    if has_delta_connector(spark):
        return "spark"
    reason = _missing_connector or "the session's spark.sql.extensions/spark_catalog do not load Delta"
    if cfg.output.engine == "spark" or cfg.output.is_catalog:
        raise DeltaConnectorMissing(_fix(reason))
    log.warning("Delta's Spark connector is not available (%s): the tables are written with delta-rs", reason)
    return "delta-rs"
