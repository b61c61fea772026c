"""Quality of a run's vectors, measured on the staged rows before anything is committed, and the gates
that judge it.

* `vector_stats`: per vector column, how many vectors, how many hold NaN/infinity, and the min/mean/max
  L2 norm of the finite ones (all should be 1: the tables hold normalised vectors).
* `drift`: the mean cosine between this run's vectors and the stored vectors of the same model for rows
  whose content hash did not change. Re-encoding unchanged content with the same weights should give the
  same vectors; a drop means the preprocessing, the text template or the runtime changed what the model
  sees.

The gate functions return the breaches as messages (empty when the run may commit); the pipeline
raises with them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from pyspark.sql import Column, DataFrame, Row
from pyspark.sql import functions as F

from depop_embed.config import ThresholdsConfig


@dataclass(frozen=True)
class VectorStats:
    vectors: int  # non-null vectors
    non_finite: int  # of those, vectors holding NaN or infinity
    norm_min: float | None  # over the finite vectors; None when there are none
    norm_mean: float | None
    norm_max: float | None


@dataclass(frozen=True)
class Drift:
    rows: int  # rows compared: same key and content hash as a stored ok row
    mean_cosine: float | None  # None when no row was compared


def vector_aggregates(df: DataFrame) -> list[Column]:
    """Aggregate expressions for the stats of every vector column of `df`, to run in the same pass as
    other aggregates; `vector_stats` reads them back."""
    aggregates = []
    for column in _vector_columns(df.columns):
        vector = F.col(column)
        non_finite = vector.isNotNull() & F.exists(vector, lambda x: F.isnan(x) | (F.abs(x) == float("inf")))
        norm = F.when(vector.isNotNull() & ~non_finite, F.sqrt(_dot(vector, vector)))
        aggregates += [
            F.count(vector).alias(f"{column}.vectors"),
            F.count(F.when(non_finite, 1)).alias(f"{column}.non_finite"),
            F.min(norm).alias(f"{column}.norm_min"),
            F.avg(norm).alias(f"{column}.norm_mean"),
            F.max(norm).alias(f"{column}.norm_max"),
        ]
    return aggregates


def vector_stats(aggregated: Row, columns: Sequence[str]) -> dict[str, VectorStats]:
    """The stats per vector column from the row that `vector_aggregates` (over a frame with `columns`) produced."""
    fields = VectorStats.__dataclass_fields__
    return {column: VectorStats(**{f: aggregated[f"{column}.{f}"] for f in fields}) for column in _vector_columns(columns)}


def _vector_columns(columns: Sequence[str]) -> list[str]:
    return [c for c in columns if c.endswith("embedding")]


def drift(staged: DataFrame, stored: DataFrame, key: Sequence[str], hash_column: str) -> Drift:
    """Compare this run's ok vectors (`embedding`) with the stored ok vectors of rows with the same key
    (model_id included) and the same `hash_column`."""

    def ok_vectors(df: DataFrame, alias: str) -> DataFrame:
        return df.where("status = 'ok' AND embedding IS NOT NULL").select(*key, hash_column, F.col("embedding").alias(alias))

    pairs = ok_vectors(staged, "new").join(ok_vectors(stored, "old"), [*key, hash_column])
    cosine = _dot(F.col("new"), F.col("old")) / (F.sqrt(_dot(F.col("new"), F.col("new"))) * F.sqrt(_dot(F.col("old"), F.col("old"))))
    row = pairs.agg(F.count("*").alias("rows"), F.avg(cosine).alias("mean_cosine")).first()
    return Drift(int(row["rows"]), row["mean_cosine"])


def source_breaches(listings_read: int, thresholds: ThresholdsConfig) -> list[str]:
    if listings_read < thresholds.min_listings:
        return [f"listings: {listings_read} rows read, fewer than thresholds.min_listings {thresholds.min_listings}"]
    return []


def vector_breaches(
    stats: Mapping[str, Mapping[str, VectorStats]], drifts: Mapping[str, Drift], thresholds: ThresholdsConfig
) -> list[str]:
    """Gates on the staged vectors: `stats` per table and column, `drifts` per table."""
    breaches = []
    non_finite = {
        f"{table}.{column}": s.non_finite for table, columns in stats.items() for column, s in columns.items() if s.non_finite
    }
    if sum(non_finite.values()) > thresholds.max_non_finite:
        breaches.append(
            f"{sum(non_finite.values())} vectors hold NaN or infinity ("
            + ", ".join(f"{name}: {n}" for name, n in non_finite.items())
            + f"), over thresholds.max_non_finite {thresholds.max_non_finite}"
        )
    for table, d in drifts.items():
        # `not >=` also catches a NaN mean
        if d.rows and not (d.mean_cosine is not None and d.mean_cosine >= thresholds.min_drift_cosine):
            breaches.append(
                f"{table}: mean cosine to the stored vectors of {d.rows} unchanged rows is {d.mean_cosine:.4f}, "
                f"under thresholds.min_drift_cosine {thresholds.min_drift_cosine}"
            )
    return breaches


def _dot(a: Column, b: Column) -> Column:
    return F.aggregate(F.zip_with(a, b, lambda x, y: x.cast("double") * y.cast("double")), F.lit(0.0).cast("double"), lambda acc, x: acc + x)
