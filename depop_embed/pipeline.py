"""One run of the embedding job: read -> render text -> encode -> stage -> check -> fuse -> commit.

Encoded rows are staged as Parquet before anything is committed, so the encoders run exactly once per
row, the error-rate gate sees every row before any table changes, and each table then changes in a
single MERGE commit.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from depop_embed import __version__, encoders, fusion, listing_text, quality, registry, sources, tracking
from depop_embed.config import Config, ModelConfig
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
class Staged:
    """A table's rows for this run, written once to Parquet and profiled in one pass."""

    df: DataFrame
    path: str
    rows: int
    errors: int  # rows with status = 'error'
    wrong_dims: int  # rows holding a vector whose length is not the model's dimension
    vectors: dict[str, quality.VectorStats]  # per vector column: count, non-finite, norms


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
        for kind, batches in (("images", "image_batches"), ("texts", "text_batches")):
            rows, secs = self.stats.get(kind, 0), self.seconds.get(kind, 0.0)
            rate = rows / secs if secs else 0.0
            lines.append(
                f"  encoded {rows} {kind} in {self.stats.get(batches, 0)} batches, {secs:.1f}s ({rate:.1f}/s)"
            )
        return "\n".join(lines)


def run(spark: SparkSession, cfg: Config) -> RunSummary:
    """One job run, recorded as an MLflow run (FAILED, with the reason, when it raises)."""
    run_id = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"
    with tracking.tracked_run(cfg, run_id) as tracker:
        summary = _run(spark, cfg, run_id, tracker)
        tracker.log_summary(summary)
    return summary


def _run(spark: SparkSession, cfg: Config, run_id: str, tracker: tracking.RunTracker) -> RunSummary:
    started = time.monotonic()
    embedded_at = datetime.now(timezone.utc)
    engine = resolve_engine(spark, cfg)
    writer = _writer(spark, cfg, engine)
    staging = f"{cfg.staging_path.rstrip('/')}/{run_id}"
    stats = spark.sparkContext.accumulator({}, CounterParam())
    partitions = cfg.encode.partitions or spark.sparkContext.defaultParallelism
    # A runtime SQL setting, so it applies to an existing (Databricks) session too.
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(cfg.encode.arrow_batch_size))
    seconds = tracker.seconds

    src = None
    try:
        # A registered model is pinned to one version for the whole run and downloaded once, here.
        model, package_dir = registry.prepare(cfg.model, cfg.tracking, os.path.abspath(f"{staging}/model"))
        mid = encoders.model_id(model)
        dim = encoders.embedding_dim(model, package_dir)
        settings = _encode_settings(spark, cfg, model, package_dir)
        tracker.log_params({"model_id": mid, "engine": engine, "run_id": run_id})
        log.info(
            "run %s: model %s, %s engine, tables under %s, Spark master %s",
            run_id, mid, engine, cfg.output.location, spark.sparkContext.master,
        )
        src = sources.read(spark, cfg, engine)
        rows_read = {"listings": src.listings.count(), "images": src.images.count()}
        tracker.log_metrics({f"read/{name}": n for name, n in rows_read.items()})
        _fail_if(quality.source_breaches(rows_read["listings"], cfg.thresholds))
        log.info(
            "to encode: %d listing texts, %d photos, in %d partitions (batches of %d photos / %d texts)",
            rows_read["listings"], rows_read["images"], partitions,
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
            TEXT_TABLE.name: _stage(spark, texts, f"{staging}/{TEXT_TABLE.name}", "texts", dim, seconds),
            IMAGE_TABLE.name: _stage(spark, images, f"{staging}/{IMAGE_TABLE.name}", "images", dim, seconds),
        }
        tracker.log_staged(staged, cfg.tracking.error_sample_rows)
        check_error_rates(staged, cfg.thresholds.max_error_rate)

        listings = fusion.fuse(
            src.listings, staged[TEXT_TABLE.name].df, staged[IMAGE_TABLE.name].df, cfg.fusion.image_weight
        ).select("*", *_stamp(mid, embedded_at, "updated_at"))
        staged[LISTING_TABLE.name] = _stage(spark, listings, f"{staging}/{LISTING_TABLE.name}", "listings", dim, seconds)
        tracker.log_staged({LISTING_TABLE.name: staged[LISTING_TABLE.name]}, cfg.tracking.error_sample_rows)
        check_dimensions(staged, dim)
        vectors = {name: t.vectors for name, t in staged.items()}
        drifts = {
            spec.name: quality.drift(staged[spec.name].df, writer.read(spark, spec), spec.key, hash_column)
            for spec, hash_column in ((IMAGE_TABLE, "content_hash"), (TEXT_TABLE, "text_hash"))
        }
        tracker.log_quality(vectors, drifts)
        _fail_if(quality.vector_breaches(vectors, drifts, cfg.thresholds))

        commit_info = {"depop_embed.run_id": run_id, "depop_embed.model_id": mid, "depop_embed.version": __version__}
        results = {}
        commit_started = time.monotonic()
        for spec in (IMAGE_TABLE, TEXT_TABLE, LISTING_TABLE):
            table = staged[spec.name]
            writer.merge(spec, table.path, commit_info)
            results[spec.name] = TableResult(writer.location(spec), table.rows, table.errors, writer.version(spec))
        seconds["commit"] = time.monotonic() - commit_started
    finally:
        _remove(spark, staging)
        if src is not None:
            src.unpersist()
    seconds["total"] = time.monotonic() - started
    summary = RunSummary(run_id, mid, engine, results, dict(stats.value), seconds)
    log.info("run %s done in %.1fs", run_id, seconds["total"])
    return summary


def check_error_rates(staged: dict[str, Staged], max_rate: float) -> None:
    """Fail the run (before any commit) when a table's share of error rows is over the threshold."""
    breaches = [
        f"{name}: error rate {t.errors / t.rows:.1%} ({t.errors} of {t.rows} rows) is over "
        f"thresholds.max_error_rate {max_rate:.1%}; most common: {_top_reasons(t.df)}"
        for name, t in staged.items()
        if t.rows and t.errors / t.rows > max_rate
    ]
    _fail_if(breaches)


def _fail_if(breaches: list[str]) -> None:
    if breaches:
        raise RunFailed("quality gate failed, nothing committed:\n  " + "\n  ".join(breaches))


def check_dimensions(staged: dict[str, Staged], dim: int) -> None:
    """Every vector must have the architecture's dimension (a mismatched checkpoint would not)."""
    for name, t in staged.items():
        if t.wrong_dims:
            raise RunFailed(f"quality gate failed, nothing committed: {name}: {t.wrong_dims} rows hold vectors that are not {dim}-d")


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


def _stage(spark: SparkSession, df: DataFrame, path: str, what: str, dim: int, seconds: dict[str, float]) -> Staged:
    """Run `df` once into Parquet at `path` and read it back (what follows never re-encodes); profile it."""
    started = time.monotonic()
    df.write.mode("overwrite").parquet(path)
    staged = spark.read.parquet(path)
    elapsed = seconds[what] = time.monotonic() - started
    is_error = F.col("status") == "error" if "status" in staged.columns else F.lit(False)
    wrong_dim = F.lit(False)
    for column in (c for c in staged.columns if c.endswith("embedding")):
        wrong_dim = wrong_dim | (F.col(column).isNotNull() & (F.size(column) != dim))
    profile = staged.agg(
        F.count("*").alias("rows"),
        F.count(F.when(is_error, 1)).alias("errors"),
        F.count(F.when(wrong_dim, 1)).alias("wrong_dims"),
        *quality.vector_aggregates(staged),
    ).first()
    log.info("%s: %d rows in %.1fs (%.1f rows/s)", what, profile["rows"], elapsed, profile["rows"] / elapsed if elapsed else 0.0)
    return Staged(
        staged, path, int(profile["rows"]), int(profile["errors"]), int(profile["wrong_dims"]),
        quality.vector_stats(profile, staged.columns),
    )


def _encode_settings(spark: SparkSession, cfg: Config, model: ModelConfig, package_dir: str | None) -> EncodeSettings:
    return EncodeSettings(
        model=model,
        package_dir=package_dir,
        image_batch_size=cfg.encode.image_batch_size,
        text_batch_size=cfg.encode.text_batch_size,
        torch_threads=cfg.encode.torch_threads or int(spark.conf.get("spark.task.cpus", "1")),
        decode_threads=cfg.encode.decode_threads,
        max_image_pixels=cfg.encode.max_image_pixels,
    )


def _stamp(model_id: str, at: datetime, time_column: str) -> list:
    return [F.lit(model_id).alias("model_id"), F.lit(at).cast("timestamp").alias(time_column)]


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
