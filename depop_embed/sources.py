"""Reading the upstream tables: listings and listing photos.

Both are checked against the input contract (a missing column fails at once, naming it), cast to the
contract's types, and deduplicated on their key keeping the latest `updated_at` (ties broken on the
row's content, so the choice is deterministic). Photos whose listing does not exist are dropped;
relative photo URIs are made absolute against `images.uri_root`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import datetime, timezone

from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from depop_embed.config import IMAGE_COLUMNS, LISTING_COLUMNS, Config, ImageSourceConfig, SourceConfig

_LISTING_TYPES = {"listing_id": "string", "price": "double", "updated_at": "timestamp"}
_IMAGE_TYPES = {"listing_id": "string", "image_id": "string", "position": "int", "uri": "string", "updated_at": "timestamp"}


class SourceError(ValueError):
    """An upstream table cannot be read or does not meet the input contract."""


@dataclass
class Sources:
    listings: DataFrame  # LISTING_COLUMNS, one row per listing_id
    images: DataFrame  # IMAGE_COLUMNS with `uri` absolute, one row per (listing_id, image_id), listing exists
    # What was read, for the commit metadata: a Delta version, or the files and when they were read.
    snapshot: dict[str, str] = field(default_factory=dict)

    def unpersist(self) -> None:
        self.listings.unpersist()
        self.images.unpersist()


def read(spark: SparkSession, cfg: Config, engine: str) -> Sources:
    """The run's view of both sources, persisted: every later step sees the same snapshot."""
    raw_listings, listings_snapshot = _read_table(spark, cfg.listings, engine)
    raw_images, images_snapshot = _read_table(spark, cfg.images, engine)
    listings = _conform(raw_listings, "listings", LISTING_COLUMNS, _LISTING_TYPES)
    listings = latest_per_key(listings, ["listing_id"]).persist()
    images = _conform(raw_images, "images", IMAGE_COLUMNS, _IMAGE_TYPES)
    images = (
        latest_per_key(images, ["listing_id", "image_id"])
        .join(listings.select("listing_id"), "listing_id", "left_semi")
        .withColumn("uri", _absolute_uri(F.col("uri"), uri_root(cfg.images)))
        .persist()
    )
    return Sources(listings, images, {"listings": listings_snapshot, "images": images_snapshot})


def latest_per_key(df: DataFrame, key: list[str]) -> DataFrame:
    """One row per key (rows with a null key are dropped): the latest updated_at, ties broken on content."""
    order = [F.col("updated_at").desc_nulls_last(), F.xxhash64(*df.columns).desc()]
    return (
        df.where(" AND ".join(f"{k} IS NOT NULL" for k in key))
        .withColumn("_rank", F.row_number().over(Window.partitionBy(*key).orderBy(*order)))
        .where("_rank = 1")
        .drop("_rank")
    )


def uri_root(src: ImageSourceConfig) -> str:
    """Where relative photo URIs point: `uri_root`, else the folder that holds the photo table."""
    if src.uri_root:
        return src.uri_root.rstrip("/")
    parent = os.path.dirname(src.path.rstrip("/"))
    return os.path.abspath(parent) if "://" not in src.path else parent


def _absolute_uri(uri, root: str):
    is_absolute = uri.rlike(r"^([A-Za-z][A-Za-z0-9+.\-]*:|/)")
    return F.when(is_absolute | (F.lit(root) == ""), uri).otherwise(F.concat(F.lit(root + "/"), uri))


def _read_table(spark: SparkSession, src: SourceConfig, engine: str) -> tuple[DataFrame, str]:
    """-> (rows, snapshot): a Delta source is read at one version, which the snapshot names."""
    read_at = f"{src.format}:{src.path} read at {datetime.now(timezone.utc).isoformat(timespec='seconds')}"
    try:
        if src.format == "delta":
            if engine == "spark":
                ident = f"delta.`{src.path}`" if "/" in src.path else src.path
                version = spark.sql(f"DESCRIBE HISTORY {ident} LIMIT 1").first()["version"]
                return spark.sql(f"SELECT * FROM {ident} VERSION AS OF {version}"), f"delta:{src.path}@v{version}"
            from deltalake import DeltaTable

            table = DeltaTable(src.path)
            return spark.createDataFrame(table.to_pyarrow_table()), f"delta:{src.path}@v{table.version()}"
        if src.format == "csv":
            return spark.read.options(header=True, multiLine=True, escape='"').csv(src.path), read_at
        return spark.read.format(src.format).load(src.path), read_at
    except Exception as exc:  # Spark's AnalysisException, delta-rs's TableNotFoundError, ...
        raise SourceError(f"cannot read {src.format} table at {src.path}: {exc}") from exc


def _conform(df: DataFrame, name: str, required: tuple[str, ...], types: dict[str, str]) -> DataFrame:
    if not df.columns:  # an empty JSON/CSV export has no schema to infer: it is an empty table
        ddl = ", ".join(f"`{c}` {types.get(c, 'string')}" for c in required)
        return df.sparkSession.createDataFrame([], ddl)
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise SourceError(
            f"{name}.path: missing required column(s) {', '.join(missing)} (found: {', '.join(df.columns)})"
        )
    return df.select(*[F.col(c).cast(types.get(c, "string")).alias(c) for c in required])
