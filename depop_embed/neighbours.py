"""Top-k nearest active listings of every active listing, in Spark, by blocked matrix products.

Listings are numbered in listing_id order and hashed into `B = ceil(n / block_size)` blocks; a block is
one row holding its listings' ids, numbers and vectors. Every candidate block is copied once per query block (B
copies, tagged with the query block's number) and joined to the query blocks on that number: an
equi-join of B² block pairs, never a cross join of listings. One Python task multiplies the two
blocks of a pair (block_size x block_size cosines, as one BLAS call), and keeps, per query listing, the
k best candidates over the consecutive pairs of its query block that it sees; a last step keeps each
listing's k best over all partial lists. Work is the n² dot products of brute force; memory per task
is two blocks and a (block_size x k) running list; shuffled data is B copies of the vectors.

Scores come from `reader.cosine_scores` and equal scores are ordered by listing_id, as in
`reader.ListingVectors.nearest`, so both give the same neighbours.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Iterator

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from depop_embed import merge_source
from depop_embed.config import Config
from depop_embed.reader import RunningTopK, cosine_scores, embedding_column
from depop_embed.tables import LISTING_TABLE, NEIGHBOURS_TABLE, TableWriter, open_writer

log = logging.getLogger(__name__)

_PARTIAL_SCHEMA = "listing_id string, neighbour_id string, neighbour_ordinal long, score float"


def active_vectors(writer: TableWriter, model_id: str, column: str) -> DataFrame:
    """(listing_id, vector) of the model's active listings that have `column`."""
    listings = writer.read(LISTING_TABLE, writer.version(LISTING_TABLE))
    return listings.where(
        (F.col("model_id") == model_id) & F.col("is_active") & F.col(column).isNotNull()
    ).select("listing_id", F.col(column).alias("vector"))


def block_pairs(vectors: DataFrame, block_size: int) -> tuple[DataFrame, int]:
    """(listing_id, vector) -> one row per (query block, candidate block) pair, and the number of blocks.

    A pair row: q_block, q_ids, q_ordinals, q_vectors, c_block, c_ids, c_ordinals, c_vectors."""
    n = vectors.count()
    blocks = max(1, math.ceil(n / block_size))
    # Ordinals follow listing_id order (monotonically_increasing_id keeps a sorted frame's order), so
    # integer comparisons break ties as listing_id would; a hash spreads any id scheme evenly over blocks.
    numbered = vectors.orderBy("listing_id").withColumn("ordinal", F.monotonically_increasing_id())
    grouped = (
        numbered.withColumn("block", F.pmod(F.xxhash64("listing_id"), F.lit(blocks)).cast("int"))
        .groupBy("block")
        .agg(F.sort_array(F.collect_list(F.struct("ordinal", "listing_id", "vector"))).alias("rows"))
        .select(
            "block",
            F.col("rows.listing_id").alias("ids"),
            F.col("rows.ordinal").alias("ordinals"),
            F.col("rows.vector").alias("vectors"),
        )
        # Computed once: both sides of the join must see the same ordinals.
        .localCheckpoint(eager=True)
    )
    queries = grouped.select(*[F.col(c).alias(f"q_{c}") for c in grouped.columns])
    candidates = grouped.select(
        *[F.col(c).alias(f"c_{c}") for c in grouped.columns],
        F.explode(F.sequence(F.lit(0), F.lit(blocks - 1))).alias("q_block"),
    )
    # Joined on the query block's number: partitions (and the sort of a sort-merge join) follow it, so
    # a task meets the pairs of one query block one after another.
    return queries.join(candidates, "q_block"), blocks


def top_k(pairs: DataFrame, k: int) -> DataFrame:
    """Block pairs -> (listing_id, rank, neighbour_id, score): each listing's k best other listings."""
    partial = pairs.sortWithinPartitions("q_block").mapInPandas(_partial_top_k(k), _PARTIAL_SCHEMA)
    order = Window.partitionBy("listing_id").orderBy(F.desc("score"), "neighbour_ordinal")
    return (
        partial.withColumn("rank", F.row_number().over(order))
        .where(F.col("rank") <= k)
        .select("listing_id", F.col("rank").cast("int"), "neighbour_id", "score")
    )


def _partial_top_k(k: int):
    def run(frames: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        best = None  # the running k best of the current query block
        for frame in frames:
            for pair in frame.itertuples(index=False):
                if best is not None and best.block != pair.q_block:
                    yield best.rows()
                    best = None
                if best is None:
                    best = _RunningBest(pair.q_block, pair.q_ids, pair.q_ordinals, pair.q_vectors, k)
                best.add(pair.c_ids, pair.c_ordinals, pair.c_vectors)
        if best is not None:
            yield best.rows()

    return run


class _RunningBest:
    """The k best candidates so far of each listing in one query block."""

    def __init__(self, block: int, ids, ordinals, vectors, k: int):
        self.block = block
        self.ids = np.asarray(ids, dtype=object)
        self.ordinals = np.asarray(ordinals, dtype=np.int64)
        self.matrix = _matrix(vectors).astype(np.float64)  # once, not per candidate block (see cosine_scores)
        self.best = RunningTopK(len(self.ids), k, object)

    def add(self, ids, ordinals, vectors) -> None:
        ordinals = np.asarray(ordinals, dtype=np.int64)
        scores = cosine_scores(self.matrix, _matrix(vectors))
        scores[self.ordinals[:, None] == ordinals[None, :]] = -np.inf  # a listing is not its own neighbour
        self.best.add(scores, ordinals, np.asarray(ids, dtype=object))

    def rows(self) -> pd.DataFrame:
        best = self.best
        found = np.isfinite(best.scores)  # -inf: the listing itself, kept only when nothing else was there
        rows, _ = np.nonzero(found)
        return pd.DataFrame({
            "listing_id": self.ids[rows],
            "neighbour_id": best.values[found],
            "neighbour_ordinal": best.ordinals[found],
            "score": best.scores[found],
        })


def _matrix(vectors) -> np.ndarray:
    return np.stack(vectors).astype(np.float32, copy=False) if len(vectors) else np.zeros((0, 0), np.float32)


@contextlib.contextmanager
def _one_pair_per_arrow_batch(spark: SparkSession):
    """A pair row holds two blocks (megabytes): hand the Python workers one at a time."""
    key = "spark.sql.execution.arrow.maxRecordsPerBatch"
    previous = spark.conf.get(key, None)
    spark.conf.set(key, "1")
    try:
        yield
    finally:
        if previous is None:
            spark.conf.unset(key)
        else:
            spark.conf.set(key, previous)


def build(spark: SparkSession, cfg: Config, model_id: str | None = None, by: str | None = None) -> merge_source.SyncResult:
    """Recompute `listing_neighbours` for one model (default: the current one) and vector (default:
    `neighbours.by`), and sync it in one commit: changed rows upserted, rows of listings that are no
    longer active deleted."""
    writer = open_writer(spark, cfg)
    model_id = model_id or writer.current_model()
    if model_id is None:
        raise LookupError(f"no current model under {cfg.output.location}: run the embedding job first")
    column = embedding_column(by or cfg.neighbours.by)
    started = time.monotonic()
    pairs, blocks = block_pairs(active_vectors(writer, model_id, column), cfg.neighbours.block_size)
    rows = top_k(pairs, cfg.neighbours.k).select(
        "listing_id",
        F.lit(model_id).alias("model_id"),
        F.lit(column).alias("embedding_column"),
        "rank",
        "neighbour_id",
        "score",
        F.current_timestamp().alias("computed_at"),
    )
    scope = (F.col("model_id") == model_id) & (F.col("embedding_column") == column)
    # A neighbour row whose neighbour and score came out the same is not rewritten: the Change Data Feed
    # shows only neighbours that changed. (`cosine_scores` gives a pair one score in any block layout;
    # the tolerance keeps float noise from ever rewriting a row.)
    unchanged = lambda new, old: (new("neighbour_id") == old("neighbour_id")) & (F.abs(new("score") - old("score")) <= 1e-6)  # noqa: E731
    with _one_pair_per_arrow_batch(spark):
        result = merge_source.sync_derived(
            spark, cfg, writer, NEIGHBOURS_TABLE, rows, scope, unchanged, "neighbours", model_id, {"embedding_column": column},
        )
    log.info(
        "neighbours of model %s by %s: %d rows (k=%d) from %d blocks (%d block pairs) in %.1fs",
        model_id, column, result.rows, cfg.neighbours.k, blocks, blocks * blocks, time.monotonic() - started,
    )
    return result
