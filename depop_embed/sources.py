"""Reading the upstream tables: listings and listing photos.

Both are checked against the input contract (a missing column fails at once, naming it), cast to the
contract's types, and deduplicated on their key keeping the latest `updated_at` (ties broken on the
row's content, so the choice is deterministic). Photos whose listing does not exist are skipped;
relative photo URIs are made absolute against `images.uri_root`. Every row left out is counted, by
reason, in `Sources.counts`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from urllib.parse import urlsplit

from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from depop_embed.config import IMAGE_COLUMNS, LISTING_COLUMNS, Config, ImageSourceConfig, SourceConfig
from depop_embed.uri_rules import UriRules, build_rules

log = logging.getLogger(__name__)

_LISTING_TYPES = {"listing_id": "string", "price": "double", "updated_at": "timestamp"}
_IMAGE_TYPES = {"listing_id": "string", "image_id": "string", "position": "int", "uri": "string", "updated_at": "timestamp"}
_DROPPED = "_dropped"  # why a source row is left out: null for the rows a run uses


class SourceError(ValueError):
    """An upstream table cannot be read or does not meet the input contract."""


@dataclass
class Sources:
    listings: DataFrame  # LISTING_COLUMNS, one row per listing_id
    images: DataFrame  # IMAGE_COLUMNS with `uri` absolute, one row per (listing_id, image_id), listing exists
    # Rows read and rows left out, by reason: listings_read, listings_duplicate, listings_without_key,
    # photos_read, photos_duplicate, photos_without_key, photos_without_listing.
    counts: dict[str, int]
    # What was read, for the commit metadata: a Delta version, or the files and when they were read.
    snapshot: dict[str, str] = field(default_factory=dict)
    _cached: tuple[DataFrame, ...] = ()

    def unpersist(self) -> None:
        for df in self._cached:
            df.unpersist()


def read(spark: SparkSession, cfg: Config, engine: str) -> Sources:
    """The run's view of both sources, persisted: every later step sees the same snapshot."""
    raw_listings, listings_snapshot = _read_table(spark, cfg.listings, engine)
    raw_images, images_snapshot = _read_table(spark, cfg.images, engine)
    listings = _conform(raw_listings, "listings", LISTING_COLUMNS, _LISTING_TYPES)
    listings = _mark_dropped(listings, ["listing_id"]).persist()
    kept_listings = listings.where(F.col(_DROPPED).isNull()).drop(_DROPPED)
    images = _conform(raw_images, "images", IMAGE_COLUMNS, _IMAGE_TYPES)
    listed = kept_listings.select("listing_id", F.lit(True).alias("_listed"))
    images = (
        _mark_dropped(images, ["listing_id", "image_id"])
        .join(listed, "listing_id", "left")
        .withColumn(_DROPPED, F.coalesce(_DROPPED, F.when(F.col("_listed").isNull(), "without_listing")))
        .drop("_listed")
        .withColumn("uri", _absolute_uri(F.col("uri"), uri_root(cfg.images)))
        .persist()
    )
    counts = {
        **_tally(listings, "listings", ("duplicate", "without_key")),
        **_tally(images, "photos", ("duplicate", "without_key", "without_listing")),
    }
    log.info("sources: %s", ", ".join(f"{k}={v}" for k, v in counts.items()))
    return Sources(
        listings=kept_listings,
        images=images.where(F.col(_DROPPED).isNull()).drop(_DROPPED).select(*IMAGE_COLUMNS),
        counts=counts,
        snapshot={"listings": listings_snapshot, "images": images_snapshot},
        _cached=(listings, images),
    )


def describe_counts(c: dict[str, int]) -> str:
    """One summary line from `Sources.counts`: what was read and what was left out."""
    return (
        f"  sources: {c['listings_read']} listing rows read, {c['listings_duplicate']} older duplicates and "
        f"{c['listings_without_key']} without listing_id left out; {c['photos_read']} photo rows read, "
        f"{c['photos_duplicate']} older duplicates, {c['photos_without_listing']} of unknown listings and "
        f"{c['photos_without_key']} without listing_id/image_id left out"
    )


def _mark_dropped(df: DataFrame, key: list[str]) -> DataFrame:
    """Add `_dropped`: null for the one row kept per key (the latest updated_at, ties broken on
    content), 'duplicate' for the other rows of its key, 'without_key' where a key column is null."""
    order = [F.col("updated_at").desc_nulls_last(), F.xxhash64(*df.columns).desc()]
    has_key: Column = F.lit(True)
    for k in key:
        has_key = has_key & F.col(k).isNotNull()
    rank = F.row_number().over(Window.partitionBy(*key).orderBy(*order))
    return df.withColumn(_DROPPED, F.when(~has_key, "without_key").when(rank > 1, "duplicate"))


def _tally(df: DataFrame, name: str, reasons: tuple[str, ...]) -> dict[str, int]:
    """Rows read and rows left out per reason; this first action also fills the cache."""
    by_reason = {row[_DROPPED]: row["count"] for row in df.groupBy(_DROPPED).count().collect()}
    return {f"{name}_read": sum(by_reason.values()), **{f"{name}_{r}": by_reason.get(r, 0) for r in reasons}}


def uri_root(src: ImageSourceConfig) -> str:
    """Where relative photo URIs point: `uri_root`, else the folder that holds the photo table."""
    if src.uri_root:
        return src.uri_root.rstrip("/")
    parent = os.path.dirname(src.path.rstrip("/"))
    return os.path.abspath(parent) if "://" not in src.path else parent


def photo_rules(src: ImageSourceConfig) -> UriRules:
    """What photo URIs may be opened: `allowed_uri_prefixes`, else the folder that holds the photo
    table and `uri_root` (a catalog table name has no folder)."""
    entries = src.allowed_uri_prefixes
    if not entries:
        places = [src.uri_root] + ([os.path.dirname(src.path.rstrip("/"))] if "/" in src.path else [])
        entries = tuple(p if len(urlsplit(p).scheme) > 1 else os.path.abspath(p) for p in places if p)
    return build_rules(entries, src.fetch.allow_private_networks)


def _absolute_uri(uri, root: str):
    is_absolute = uri.rlike(r"^([A-Za-z][A-Za-z0-9+.\-]*:|/)")
    # An empty uri stays empty (a 'missing' photo), not the root folder itself.
    keep = is_absolute | (F.lit(root) == "") | (F.trim(uri) == "")
    return F.when(keep, uri).otherwise(F.concat(F.lit(root + "/"), uri))


def _read_table(spark: SparkSession, src: SourceConfig, engine: str) -> tuple[DataFrame, str]:
    """-> (rows, snapshot): a Delta source is read at one version, which the snapshot names."""
    read_at = f"{src.format}:{src.path} read at {datetime.now(timezone.utc).isoformat(timespec='seconds')}"
    try:
        if src.format == "delta":
            if engine == "spark":
                from depop_embed.tables import absolute_location, quote_name

                ident = f"delta.`{absolute_location(src.path)}`" if "/" in src.path else quote_name(src.path)
                version = spark.sql(f"DESCRIBE HISTORY {ident} LIMIT 1").first()["version"]
                return spark.sql(f"SELECT * FROM {ident} VERSION AS OF {version}"), f"delta:{src.path}@v{version}"
            from deltalake import DeltaTable

            from depop_embed.tables import delta_rs_frame

            table = DeltaTable(src.path)
            return delta_rs_frame(spark, table), f"delta:{src.path}@v{table.version()}"
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
