"""One run of the embedding job: read -> render text -> encode -> stage -> check -> fuse -> commit.

Encoded rows are staged as Parquet before anything is committed, so the encoders run exactly once per
row, the error-rate gate sees every row before any table changes, and each table then changes in a
single MERGE commit.
"""

from __future__ import annotations

import logging
import shutil
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from depop_embed import __version__, encoders, fusion, listing_text, sources
from depop_embed.config import Config
from depop_embed.session import resolve_engine
from depop_embed.tables import (
    IMAGE_TABLE, LISTING_TABLE, TEXT_TABLE, DeltaRsWriter, SparkDeltaWriter, TableWriter,
)
from depop_embed.udfs import (
    IMAGE_OUTPUT_SCHEMA, TEXT_OUTPUT_SCHEMA, CounterParam, EncodeSettings, encode_images, encode_texts,
)

log = logging.getLogger(__name__)

_RENDERED_TEXT_SCHEMA = "listing_id string, text string, text_hash string, template_version string"


class RunFailed(RuntimeError):
    """A quality gate was breached; nothing was committed."""


@dataclass
class TableResult:
    location: str
    rows: int
    errors: int
    version: int | None


@dataclass
class RunSummary:
    run_id: str
    model_id: str
    engine: str
    tables: dict[str, TableResult]
    stats: dict[str, Any]
    seconds: dict[str, float] = field(default_factory=dict)

    def describe(self) -> str:
        lines = [f"run {self.run_id}: model {self.model_id}, {self.engine} engine, {self.seconds.get('total', 0):.1f}s"]
        for name, t in self.tables.items():
            lines.append(f"  {name}: {t.rows} rows written ({t.errors} errors) -> {t.location} (version {t.version})")
        for kind in ("images", "texts"):
            secs = self.seconds.get(kind, 0.0)
            rate = self.stats.get(kind, 0) / secs if secs else 0.0
            lines.append(f"  encoded {self.stats.get(kind, 0)} {kind} in {secs:.1f}s ({rate:.1f}/s)")
        return "\n".join(lines)


def run(spark: SparkSession, cfg: Config) -> RunSummary:
    started = time.monotonic()
    run_id = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"
    embedded_at = datetime.now(timezone.utc)
    engine = resolve_engine(spark, cfg)
    writer = _writer(spark, cfg, engine)
    mid = encoders.model_id(cfg.model)
    staging = f"{cfg.staging_path.rstrip('/')}/{run_id}"
    stats = spark.sparkContext.accumulator({}, CounterParam())
    settings = _encode_settings(spark, cfg)
    partitions = cfg.encode.partitions or spark.sparkContext.defaultParallelism
    # A runtime SQL setting, so it applies to an existing (Databricks) session too.
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(cfg.encode.arrow_batch_size))
    seconds: dict[str, float] = {}
    log.info(
        "run %s: model %s, %s engine, tables under %s, Spark master %s",
        run_id, mid, engine, cfg.output.location, spark.sparkContext.master,
    )

    src = None
    try:
        src = sources.read(spark, cfg, engine)
        log.info(
            "to encode: %d listing texts, %d photos, in %d partitions (batches of %d photos / %d texts)",
            src.listings.count(), src.images.count(), partitions,
            settings.image_batch_size, settings.text_batch_size,
        )
        text_cfg = cfg.text
        texts = (
            src.listings.mapInPandas(
                lambda frames: (listing_text.render_frame(f, text_cfg) for f in frames), _RENDERED_TEXT_SCHEMA
            )
            .repartition(partitions)
            .mapInPandas(encode_texts(settings, stats), TEXT_OUTPUT_SCHEMA)
            .select("*", *_stamp(mid, embedded_at, "embedded_at"))
        )
        images = (
            src.images.select("listing_id", "image_id", "position", "uri")
            .repartition(partitions)
            .mapInPandas(encode_images(settings, stats), IMAGE_OUTPUT_SCHEMA)
            .select("*", *_stamp(mid, embedded_at, "embedded_at"))
        )
        staged = {
            TEXT_TABLE.name: _stage(spark, texts, f"{staging}/{TEXT_TABLE.name}", "texts", seconds, stats),
            IMAGE_TABLE.name: _stage(spark, images, f"{staging}/{IMAGE_TABLE.name}", "images", seconds, stats),
        }
        counts = {name: _status_counts(df) for name, df in staged.items()}
        check_error_rates(staged, counts, cfg.thresholds.max_error_rate)
        check_dimensions(staged, encoders.embedding_dim(cfg.model))

        listings = fusion.fuse(
            src.listings, staged[TEXT_TABLE.name], staged[IMAGE_TABLE.name], cfg.fusion.image_weight
        ).select("*", *_stamp(mid, embedded_at, "updated_at"))
        staged[LISTING_TABLE.name] = _stage(spark, listings, f"{staging}/{LISTING_TABLE.name}", "listings", seconds, stats)
        counts[LISTING_TABLE.name] = (staged[LISTING_TABLE.name].count(), 0)

        commit_info = {"depop_embed.run_id": run_id, "depop_embed.model_id": mid, "depop_embed.version": __version__}
        results = {}
        commit_started = time.monotonic()
        for spec in (IMAGE_TABLE, TEXT_TABLE, LISTING_TABLE):
            writer.merge(spec, f"{staging}/{spec.name}", commit_info)
            rows, errors = counts[spec.name]
            results[spec.name] = TableResult(writer.location(spec), rows, errors, writer.version(spec))
        seconds["commit"] = time.monotonic() - commit_started
    finally:
        _remove(spark, staging)
        if src is not None:
            src.unpersist()
    seconds["total"] = time.monotonic() - started
    summary = RunSummary(run_id, mid, engine, results, dict(stats.value), seconds)
    log.info("run %s done in %.1fs", run_id, seconds["total"])
    return summary


def check_error_rates(staged: dict[str, DataFrame], counts: dict[str, tuple[int, int]], max_rate: float) -> None:
    """Fail the run (before any commit) when a table's share of error rows is over the threshold."""
    breaches = []
    for name, (rows, errors) in counts.items():
        if rows and errors / rows > max_rate:
            breaches.append(
                f"{name}: error rate {errors / rows:.1%} ({errors} of {rows} rows) is over "
                f"thresholds.max_error_rate {max_rate:.1%}; most common: {_top_reasons(staged[name])}"
            )
    if breaches:
        raise RunFailed("quality gate failed, nothing committed:\n  " + "\n  ".join(breaches))


def check_dimensions(staged: dict[str, DataFrame], dim: int) -> None:
    """Every ok vector must have the architecture's dimension (a mismatched checkpoint would not)."""
    for name, df in staged.items():
        wrong = df.where((F.col("status") == "ok") & (F.size("embedding") != dim)).count()
        if wrong:
            raise RunFailed(f"quality gate failed, nothing committed: {name}: {wrong} vectors are not {dim}-d")


def _top_reasons(df: DataFrame, limit: int = 3) -> str:
    key = F.concat_ws("/", *[c for c in ("listing_id", "image_id") if c in df.columns])
    rows = (
        df.where("status = 'error'")
        .groupBy(F.substring_index("error", ":", 1).alias("reason"))
        .agg(F.count("*").alias("n"), F.slice(F.collect_list(key), 1, 3).alias("examples"))
        .orderBy(F.desc("n"), "reason")
        .limit(limit)
        .collect()
    )
    return "; ".join(f"{r['reason']} x{r['n']} (e.g. {', '.join(r['examples'])})" for r in rows)


def _stage(spark: SparkSession, df: DataFrame, path: str, what: str, seconds: dict[str, float], stats) -> DataFrame:
    """Run `df` once into Parquet at `path` and read it back: what follows never re-encodes."""
    started = time.monotonic()
    df.write.mode("overwrite").parquet(path)
    staged = spark.read.parquet(path)
    elapsed = seconds[what] = time.monotonic() - started
    rows = staged.count()
    batches = stats.value.get(f"{what[:-1]}_batches")
    log.info(
        "%s: %d rows%s in %.1fs (%.1f rows/s)",
        what, rows, f" in {batches} batches" if batches else "", elapsed, rows / elapsed if elapsed else 0.0,
    )
    return staged


def _encode_settings(spark: SparkSession, cfg: Config) -> EncodeSettings:
    return EncodeSettings(
        model=cfg.model,
        image_batch_size=cfg.encode.image_batch_size,
        text_batch_size=cfg.encode.text_batch_size,
        torch_threads=cfg.encode.torch_threads or int(spark.conf.get("spark.task.cpus", "1")),
        decode_threads=cfg.encode.decode_threads,
        max_image_pixels=cfg.encode.max_image_pixels,
    )


def _stamp(model_id: str, at: datetime, time_column: str) -> list:
    return [F.lit(model_id).alias("model_id"), F.lit(at).cast("timestamp").alias(time_column)]


def _status_counts(df: DataFrame) -> tuple[int, int]:
    row = df.agg(F.count("*").alias("rows"), F.count(F.when(F.col("status") == "error", 1)).alias("errors")).first()
    return int(row["rows"]), int(row["errors"])


def _writer(spark: SparkSession, cfg: Config, engine: str) -> TableWriter:
    if engine == "spark":
        return SparkDeltaWriter(spark, cfg.output.location, cfg.output.is_catalog)
    return DeltaRsWriter(cfg.output.location)


def _remove(spark: SparkSession, path: str) -> None:
    """Delete the run's staging folder on whatever filesystem Spark wrote it to."""
    try:
        jvm_path = spark._jvm.org.apache.hadoop.fs.Path(path)
        jvm_path.getFileSystem(spark._jsc.hadoopConfiguration()).delete(jvm_path, True)
    except Exception:  # Spark Connect has no JVM handle; staging is then a local or mounted path
        shutil.rmtree(path, ignore_errors=True)
