"""One run of the embedding job: read -> select work -> encode -> stage -> check -> fuse -> commit.

Only what changed is encoded (see `selection`). Encoded rows are staged as Parquet before anything is
committed, so the encoders run exactly once per row and the quality gates see every row before any
table changes; then each table changes in one MERGE commit (upserts, in-place updates and deletes
together), in the order photos, texts, listings. A run killed anywhere leaves each table at a whole
version, and the next run finishes the work: it compares the sources with what the tables hold, not
with what the killed run meant to do.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from depop_embed import (
    __version__, encoders, fusion, listing_text, merge_source, quality, registry, selection, sources, tracking,
)
from depop_embed.config import Config, ModelConfig
from depop_embed.session import resolve_engine
from depop_embed.tables import (
    DELETE, IMAGE_TABLE, LISTING_TABLE, META, OP_COLUMN, TABLES, TEXT_TABLE, UPSERT,
    Commit, TableSpec, TableWriter, new_run_id, open_writer,
)
from depop_embed.udfs import (
    IMAGE_OUTPUT_SCHEMA, TEXT_OUTPUT_SCHEMA, CounterParam, EncodeSettings, encode_images, encode_texts,
)

log = logging.getLogger(__name__)

# Up to this many listings to re-fuse, their ids are broadcast to the semi-joins that pick their text
# and photo rows, so the stored tables are filtered while they are scanned, not shuffled.
_BROADCAST_LISTINGS = 200_000
_RENDERED_TEXT_SCHEMA = "listing_id string, text string, text_hash string, template_version string"


class RunFailed(RuntimeError):
    """A quality gate was breached, or another run got in the way; nothing was committed."""


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
    rows: int  # rows encoded this run (photos, texts) or fused (listings)
    errors: int
    changes: dict[str, int]  # MERGE source rows per operation: upsert / meta / delete
    version: int | None  # the table's version after the run (unchanged when there was nothing to do)


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
        if "listings_read" in self.stats:
            lines.append(sources.describe_counts(self.stats))
        for name, t in self.tables.items():
            lines.append(f"  {name}: {merge_source.describe_changes(t.changes)} ({t.errors} errors) -> {t.location} (version {t.version})")
        for kind, batches in (("images", "image_batches"), ("texts", "text_batches")):
            rows, secs = self.stats.get(kind, 0), self.seconds.get(kind, 0.0)
            rate = rows / secs if secs else 0.0
            lines.append(
                f"  encoded {rows} {kind} in {self.stats.get(batches, 0)} batches, {secs:.1f}s ({rate:.1f}/s)"
            )
        if self.stats.get("images_refused"):
            lines.append(f"  refused {self.stats['images_refused']} photo URIs unopened (forbidden_uri)")
        return "\n".join(lines)


def run(spark: SparkSession, cfg: Config, now: datetime | None = None) -> RunSummary:
    """One job run, recorded as an MLflow run (FAILED, with the reason, when it raises). `now` is the
    run's time (its rows' embedded_at/updated_at, the retention cut-off): the wall clock by default."""
    now = now or datetime.now(timezone.utc)
    run_id = new_run_id(now)
    with tracking.tracked_run(cfg, run_id) as tracker:
        summary = _run(spark, cfg, now, run_id, tracker)
        tracker.log_summary(summary)
    return summary


def _run(spark: SparkSession, cfg: Config, now: datetime, run_id: str, tracker: tracking.RunTracker) -> RunSummary:
    started = time.monotonic()
    engine = resolve_engine(spark, cfg)
    writer = open_writer(spark, cfg, engine)
    writer.check_location()
    # A registered model's alias is resolved to one version here, once: the whole run uses that version.
    model = registry.pin(cfg.model, cfg.tracking)
    mid = encoders.model_id(model)
    full_refresh = cfg.incremental.full_refresh
    staging = f"{cfg.staging_path.rstrip('/')}/{run_id}"
    stats = spark.sparkContext.accumulator({}, CounterParam())
    partitions = cfg.encode.partitions or spark.sparkContext.defaultParallelism
    # A runtime SQL setting, so it applies to an existing (Databricks) session too.
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(cfg.encode.arrow_batch_size))
    seconds = tracker.seconds
    # The versions this run's selection is computed against; a commit checks nobody of ours moved them.
    read_versions = {spec.name: writer.version(spec) for spec in TABLES}
    stored = {spec.name: writer.read(spec, read_versions[spec.name]).where(F.col("model_id") == mid) for spec in TABLES}
    log.info(
        "run %s: model %s, %s engine, tables under %s (versions %s)%s, Spark master %s",
        run_id, mid, engine, cfg.output.location, read_versions, ", full refresh" if full_refresh else "",
        spark.sparkContext.master,
    )

    tracker.log_params({"model_id": mid, "engine": engine, "run_id": run_id})

    src = None
    cached: list[DataFrame] = []  # selections counted for the log and then encoded: computed once
    try:
        # A registered model is downloaded once, for every worker to build from.
        package_dir = registry.download(model, cfg.tracking, os.path.abspath(f"{staging}/model"))
        dim = encoders.embedding_dim(model, package_dir)
        settings = _encode_settings(spark, cfg, model, package_dir)
        src = sources.read(spark, cfg, engine)
        tracker.log_params({f"source.{name}": snapshot for name, snapshot in src.snapshot.items()})
        text_cfg = cfg.text
        rendered = src.listings.mapInPandas(
            lambda frames: (listing_text.render_frame(f, text_cfg) for f in frames), _RENDERED_TEXT_SCHEMA
        )
        text_todo = selection.texts_to_encode(rendered, stored[TEXT_TABLE.name], full_refresh).persist()
        fingerprinted = selection.fingerprint_photos(src.images).persist()
        listed = src.listings.select("listing_id")
        photo_plan = selection.plan_photos(fingerprinted, stored[IMAGE_TABLE.name], listed, full_refresh)
        photo_plan.to_encode.persist()
        cached += [text_todo, fingerprinted, photo_plan.to_encode]
        counts = {
            "read/listings": src.listings.count(), "read/images": fingerprinted.count(),
            "selected/texts": text_todo.count(), "selected/images": photo_plan.to_encode.count(),
        }
        tracker.log_metrics(counts)
        _fail_if(quality.source_breaches(counts["read/listings"], cfg.thresholds))
        log.info(
            "to encode: %d of %d listing texts, %d of %d photos, in %d partitions (batches of %d photos / %d texts)",
            counts["selected/texts"], counts["read/listings"], counts["selected/images"], counts["read/images"],
            partitions, settings.image_batch_size, settings.text_batch_size,
        )
        texts = (
            text_todo.repartition(partitions)
            .mapInPandas(encode_texts(settings, stats), TEXT_OUTPUT_SCHEMA)
            .select("*", *_stamp(mid, now, "embedded_at"))
        )
        images = (
            photo_plan.to_encode.select("listing_id", "image_id", "position", "uri")
            .repartition(partitions)
            .mapInPandas(encode_images(settings, stats), IMAGE_OUTPUT_SCHEMA)
            .join(photo_plan.to_encode.select(*selection.IMAGE_KEY, "source_fingerprint"), selection.IMAGE_KEY, "left")
            .select("*", *_stamp(mid, now, "embedded_at"))
        )
        staged = {
            TEXT_TABLE.name: _stage(spark, texts, f"{staging}/{TEXT_TABLE.name}", "texts", dim, seconds),
            IMAGE_TABLE.name: _stage(spark, images, f"{staging}/{IMAGE_TABLE.name}", "images", dim, seconds),
        }
        tracker.log_staged(staged, cfg.tracking.error_sample_rows)
        check_error_rates(staged, cfg.thresholds.max_error_rate)

        listings_started = time.monotonic()
        changes = _plan_changes(cfg, src, stored, staged, photo_plan, mid, now, stats, cached)
        merges = {spec.name: merge_source.stage(changes[spec.name], f"{staging}/merge/{spec.name}") for spec in TABLES}
        fused = merges[LISTING_TABLE.name][0].where(F.col(OP_COLUMN) == UPSERT)
        staged[LISTING_TABLE.name] = profile(fused, f"{staging}/merge/{LISTING_TABLE.name}", dim)
        seconds["listings"] = time.monotonic() - listings_started
        tracker.log_staged({LISTING_TABLE.name: staged[LISTING_TABLE.name]}, cfg.tracking.error_sample_rows)
        check_dimensions(staged, dim)
        drifts = {
            spec.name: quality.drift(staged[spec.name].df, stored[spec.name], spec.key, hash_column)
            for spec, hash_column in ((IMAGE_TABLE, "content_hash"), (TEXT_TABLE, "text_hash"))
        }
        vectors = {name: t.vectors for name, t in staged.items()}
        tracker.log_quality(vectors, drifts)
        _fail_if(quality.vector_breaches(vectors, drifts, cfg.thresholds))

        commit = Commit(
            info={
                "depop_embed.run_id": run_id,
                "depop_embed.model_id": mid,
                "depop_embed.version": __version__,
                "depop_embed.full_refresh": str(full_refresh).lower(),
                **{f"depop_embed.{name}_snapshot": snap for name, snap in src.snapshot.items()},
            },
            model_id=mid,
        )
        results = {}
        commit_started = time.monotonic()
        for spec in (IMAGE_TABLE, TEXT_TABLE, LISTING_TABLE):
            merge_df, counts = merges[spec.name]
            version = read_versions[spec.name]
            if sum(counts.values()):
                if cfg.faults.kill_before_commit == spec.name:
                    os.kill(os.getpid(), signal.SIGKILL)
                version = _commit(writer, spec, f"{staging}/merge/{spec.name}", read_versions[spec.name], commit)
            elif version is None:  # nothing to write yet, but consumers can rely on the table existing
                writer.ensure(spec)
                version = writer.version(spec)
            table = staged[spec.name]
            results[spec.name] = TableResult(writer.location(spec), table.rows, table.errors, counts, version)
        if writer.current_model() is None:  # the first model written becomes the one consumers read
            writer.set_current_model(mid, f"run {run_id}", replace=False)
        seconds["commit"] = time.monotonic() - commit_started
    finally:
        merge_source.remove(spark, staging)
        for df in [*cached, src]:
            if df is not None:
                df.unpersist()
    seconds["total"] = time.monotonic() - started
    summary = RunSummary(run_id, mid, engine, results, {**src.counts, **stats.value}, seconds)
    log.info("run %s done in %.1fs", run_id, seconds["total"])
    return summary


def _plan_changes(cfg, src, stored, staged, photo_plan, mid, now, stats, cached: list[DataFrame]) -> dict[str, DataFrame]:
    """Each table's MERGE source for this run: upserts, in-place updates and deletes, with their `_op`.
    What it persists goes into `cached` (unpersisted when the run ends)."""
    images_encoded, texts_encoded = staged[IMAGE_TABLE.name].df, staged[TEXT_TABLE.name].df
    kept = selection.kept_good_vectors(images_encoded, stored[IMAGE_TABLE.name]).select(*selection.IMAGE_KEY)
    kept_count = kept.count()
    if kept_count:
        log.warning("%d photos failed transiently and keep their stored good vector", kept_count)
        stats.add({"images_kept_after_transient_error": kept_count})
    image_upserts = images_encoded.join(kept, selection.IMAGE_KEY, "left_anti")
    images_after = selection.after_run(stored[IMAGE_TABLE.name], image_upserts, photo_plan.removed, selection.IMAGE_KEY)
    texts_after = selection.after_run(stored[TEXT_TABLE.name], texts_encoded, None, ["listing_id"])
    plan = selection.plan_listings(
        src.listings, texts_after, images_after, stored[LISTING_TABLE.name], cfg.fusion.image_weight,
        cfg.incremental.full_refresh, now, cfg.incremental.retention_days,
    )
    cached.append(plan.decisions.persist())
    to_fuse, flipped, purged = plan.to_fuse, plan.flipped, plan.purged
    fuse_ids = F.broadcast(to_fuse.select("listing_id")) if to_fuse.count() <= _BROADCAST_LISTINGS else to_fuse.select("listing_id")
    fused = fusion.fuse(
        to_fuse,
        texts_after.join(fuse_ids, "listing_id", "left_semi"),
        images_after.join(fuse_ids, "listing_id", "left_semi"),
        cfg.fusion.image_weight,
    ).join(to_fuse.select("listing_id", "inputs_hash"), "listing_id")
    model = [F.lit(mid).alias("model_id")]
    purged_photos = stored[IMAGE_TABLE.name].join(purged, "listing_id", "left_semi").select(*selection.IMAGE_KEY)
    return {
        IMAGE_TABLE.name: merge_source.union(
            IMAGE_TABLE,
            (image_upserts, UPSERT),
            (photo_plan.reordered.select("*", *model), META),
            (photo_plan.removed.unionByName(purged_photos).select("*", *model), DELETE),
        ),
        TEXT_TABLE.name: merge_source.union(TEXT_TABLE, (texts_encoded, UPSERT), (purged.select("*", *model), DELETE)),
        LISTING_TABLE.name: merge_source.union(
            LISTING_TABLE,
            (fused.select("*", *_stamp(mid, now, "updated_at")), UPSERT),
            (flipped.select("*", *_stamp(mid, now, "updated_at")), META),
            (purged.select("*", *model), DELETE),
        ),
    }


def _commit(writer: TableWriter, spec: TableSpec, path: str, read_version: int | None, commit: Commit) -> int | None:
    from depop_embed.tables import ConcurrentRunError

    try:
        return writer.merge(spec, path, read_version, commit)
    except ConcurrentRunError as exc:
        raise RunFailed(f"another run is writing model {commit.model_id}: {exc}") from exc


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


def _top_reasons(df: DataFrame, limit: int = 3, examples: int = 3) -> str:
    """The most common reason codes among error rows, with their first few keys as examples."""
    key = F.concat_ws("/", *[c for c in ("listing_id", "image_id") if c in df.columns])
    errors = df.where("status = 'error'").select(F.substring_index("error", ":", 1).alias("reason"), key.alias("key"))
    nth = F.row_number().over(Window.partitionBy("reason").orderBy("key"))
    rows = (
        errors.withColumn("nth", nth)
        .groupBy("reason")
        .agg(
            F.count("*").alias("n"),
            F.sort_array(F.collect_list(F.when(F.col("nth") <= examples, F.col("key")))).alias("examples"),
        )
        .orderBy(F.desc("n"), "reason")
        .limit(limit)
        .collect()
    )
    return "; ".join(f"{r['reason']} x{r['n']} (e.g. {', '.join(r['examples'])})" for r in rows)


def _stage(spark: SparkSession, df: DataFrame, path: str, what: str, dim: int, seconds: dict[str, float]) -> Staged:
    """Run `df` once into Parquet at `path` and read it back (what follows never re-encodes); profile it."""
    started = time.monotonic()
    df.write.mode("overwrite").parquet(path)
    staged = profile(spark.read.parquet(path), path, dim)
    elapsed = seconds[what] = time.monotonic() - started
    log.info("%s: %d rows in %.1fs (%.1f rows/s)", what, staged.rows, elapsed, staged.rows / elapsed if elapsed else 0.0)
    return staged


def profile(staged: DataFrame, path: str, dim: int) -> Staged:
    """Rows, error rows, rows with a vector of the wrong dimension, and vector stats, in one pass."""
    is_error = F.col("status") == "error" if "status" in staged.columns else F.lit(False)
    wrong_dim = F.lit(False)
    for column in (c for c in staged.columns if c.endswith("embedding")):
        wrong_dim = wrong_dim | (F.col(column).isNotNull() & (F.size(column) != dim))
    row = staged.agg(
        F.count("*").alias("rows"),
        F.count(F.when(is_error, 1)).alias("errors"),
        F.count(F.when(wrong_dim, 1)).alias("wrong_dims"),
        *quality.vector_aggregates(staged),
    ).first()
    return Staged(
        staged, path, int(row["rows"]), int(row["errors"]), int(row["wrong_dims"]), quality.vector_stats(row, staged.columns)
    )


def _encode_settings(spark: SparkSession, cfg: Config, model: ModelConfig, package_dir: str | None) -> EncodeSettings:
    task_cpus = int(spark.conf.get("spark.task.cpus", "1"))
    return EncodeSettings(
        model=model,
        package_dir=package_dir,
        image_batch_size=cfg.encode.image_batch_size,
        text_batch_size=cfg.encode.text_batch_size,
        torch_threads=cfg.encode.torch_threads or task_cpus,
        decode_threads=cfg.encode.decode_threads or task_cpus,
        max_image_pixels=cfg.encode.max_image_pixels,
        fetch=cfg.images.fetch,
        uri_rules=sources.photo_rules(cfg.images),
        jpeg_draft=cfg.encode.jpeg_draft,
        device_jpeg_decode=cfg.encode.device_jpeg_decode,
    )


def _stamp(model_id: str, at: datetime, time_column: str) -> list:
    return [F.lit(model_id).alias("model_id"), F.lit(at).cast("timestamp").alias(time_column)]


def set_current_model(spark: SparkSession, cfg: Config, model_id: str, set_by: str) -> str | None:
    """Point consumers at `model_id` (it must have fused rows); returns the model it replaced."""
    writer = open_writer(spark, cfg)
    version = writer.version(LISTING_TABLE)
    rows = writer.read(LISTING_TABLE, version).where(F.col("model_id") == model_id).limit(1).count()
    if not rows:
        raise RunFailed(f"model {model_id} has no rows in {writer.location(LISTING_TABLE)}: run the job with it first")
    previous = writer.current_model()
    writer.set_current_model(model_id, set_by)
    return previous
