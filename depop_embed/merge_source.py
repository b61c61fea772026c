"""The source of a table's one MERGE commit: rows carrying their operation (`_op`), staged once as Parquet.

The embedding job builds its sources from what it encoded (`pipeline`); the derived tables (neighbours,
search vectors) are recomputed whole and synced by difference (`sync`): rows that changed are upserted,
rows that are gone are deleted, and rows that came out the same are left alone, so their Change Data
Feed holds only real changes and a rerun over unchanged vectors commits nothing.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from depop_embed import __version__
from depop_embed.config import Config
from depop_embed.tables import DELETE, LISTING_TABLE, META, OP_COLUMN, UPSERT, Commit, TableSpec, TableWriter, new_run_id

log = logging.getLogger(__name__)


def with_op(rows: DataFrame, op: str, spec: TableSpec) -> DataFrame:
    """Rows shaped as `spec`'s MERGE source: every column (missing ones null) and the operation."""
    present = set(rows.columns)
    return rows.select(
        *[F.col(c.name) if c.name in present else F.lit(None).cast(spec.spark_type(c.name)).alias(c.name) for c in spec.columns],
        F.lit(op).alias(OP_COLUMN),
    )


def union(spec: TableSpec, *parts: tuple[DataFrame, str]) -> DataFrame:
    """One MERGE source from (rows, operation) parts."""
    frames = [with_op(rows, op, spec) for rows, op in parts]
    result = frames[0]
    for frame in frames[1:]:
        result = result.unionByName(frame)
    return result


def stage(df: DataFrame, path: str) -> tuple[DataFrame, dict[str, int]]:
    """Write a MERGE source once to Parquet; count its rows per operation."""
    df.write.mode("overwrite").parquet(path)
    staged = df.sparkSession.read.parquet(path)
    counts = {row[OP_COLUMN]: int(row["n"]) for row in staged.groupBy(OP_COLUMN).agg(F.count("*").alias("n")).collect()}
    return staged, {op: counts.get(op, 0) for op in (UPSERT, META, DELETE) if counts.get(op)}


def describe_changes(changes: dict[str, int]) -> str:
    """A MERGE's rows per operation, e.g. `upsert 12, delete 3`."""
    return ", ".join(f"{op} {n}" for op, n in changes.items()) or "no change"


@dataclass(frozen=True)
class SyncResult:
    table: str
    location: str
    rows: int  # rows the table should hold in the scope after the sync
    changes: dict[str, int]  # upsert / delete rows committed
    version: int | None  # the table's version after the sync (unchanged when nothing changed)

    def describe(self) -> str:
        return f"{self.table}: {self.rows} rows, {describe_changes(self.changes)} -> {self.location} (version {self.version})"


def sync_derived(
    spark: SparkSession,
    cfg: Config,
    writer: TableWriter,
    spec: TableSpec,
    rows: DataFrame,
    scope: Column,
    unchanged: Callable[[Callable[[str], Column], Callable[[str], Column]], Column],
    job: str,
    model_id: str,
    info: dict[str, str],
) -> SyncResult:
    """`sync` one derived table as one run of `job`: its own run id, commit metadata and staging folder."""
    started = datetime.now(timezone.utc)
    run_id = new_run_id(started)
    commit = Commit(
        info={
            "depop_embed.run_id": run_id,
            "depop_embed.model_id": model_id,
            "depop_embed.version": __version__,
            "depop_embed.job": job,
            "depop_embed.listing_embeddings_version": str(writer.version(LISTING_TABLE)),
            **{f"depop_embed.{k}": v for k, v in info.items()},
        },
        model_id=model_id,
    )
    staging = f"{cfg.staging_path.rstrip('/')}/{run_id}"
    try:
        return sync(writer, spec, rows, scope, unchanged, f"{staging}/{spec.name}", commit)
    finally:
        remove(spark, staging)


def sync(
    writer: TableWriter,
    spec: TableSpec,
    rows: DataFrame,
    scope: Column,
    unchanged: Callable[[Callable[[str], Column], Callable[[str], Column]], Column],
    path: str,
    commit: Commit,
) -> SyncResult:
    """Make `spec`'s rows within `scope` (a predicate over the table) equal to `rows`, in one commit.

    `unchanged(new, old)` says when a stored row with the same key needs no rewrite; `new(c)` and `old(c)`
    are the two rows' columns."""
    read_version = writer.version(spec)
    stored = writer.read(spec, read_version).where(scope)
    key = list(spec.key)
    rows = rows.persist()
    try:
        new, old = (lambda c: F.col(f"n.`{c}`")), (lambda c: F.col(f"o.`{c}`"))
        same = (
            rows.alias("n")
            .join(stored.alias("o"), [new(k) == old(k) for k in key])
            .where(unchanged(new, old))
            .select(*[new(k).alias(k) for k in key])
        )
        upserts = rows.join(same, key, "left_anti")
        deletes = stored.select(*key).join(rows.select(*key), key, "left_anti")
        _, counts = stage(union(spec, (upserts, UPSERT), (deletes, DELETE)), path)
        total = rows.count()
    finally:
        rows.unpersist()
    if counts:
        version = writer.merge(spec, path, read_version, commit)
    else:
        writer.ensure(spec)  # consumers can rely on the table existing
        version = writer.version(spec)
    result = SyncResult(spec.name, writer.location(spec), total, counts, version)
    log.info("%s", result.describe())
    return result


def remove(spark: SparkSession, path: str) -> None:
    """Delete the run's staging folder on whatever filesystem Spark wrote it to."""
    try:
        jvm_path = spark._jvm.org.apache.hadoop.fs.Path(path)
        jvm_path.getFileSystem(spark._jsc.hadoopConfiguration()).delete(jvm_path, True)
    except Exception:  # Spark Connect has no JVM handle; staging is then a local or mounted path
        shutil.rmtree(path, ignore_errors=True)
