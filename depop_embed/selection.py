"""Work selection: compare the sources with what the tables hold for this model, and say what to do.

* texts: encode a listing whose `text_hash` (template version + exact text) is not stored;
* photos: encode a photo whose fingerprint (URI + size + modification time, without reading it; or the
  source row's `updated_at` where the store cannot say) is not stored, or whose stored row failed for a
  transient reason; update `position` in place when only the order changed; delete stored photos that
  their (still listed) listing no longer has;
* listings: re-fuse a listing whose inputs (its text row and its photo rows after this run) changed,
  flip `is_active` in place when only that changed, deactivate listings gone from the source, and purge
  every row of a listing that has been gone for longer than the retention.

A full refresh selects every text and photo. Nothing here reads or decodes a photo.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Iterator

import pandas as pd
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from depop_embed import fusion, photos

FINGERPRINTED_SCHEMA = "listing_id string, image_id string, position int, uri string, source_fingerprint string"
IMAGE_KEY = ["listing_id", "image_id"]


def photo_fingerprint(uri: str, updated_at) -> str:
    """A stand-in for the photo's bytes that costs one stat: changes when the file is replaced."""
    path = photos.local_path(uri)
    if path is None:  # object stores and URLs: trust the source row's timestamp
        return f"{uri}|updated_at={updated_at}"
    try:
        st = os.stat(path)
    except OSError:
        return f"{uri}|absent"
    return f"{uri}|size={st.st_size}|mtime_ns={st.st_mtime_ns}"


def fingerprint_photos(images: DataFrame) -> DataFrame:
    """Source photo rows -> FINGERPRINTED_SCHEMA, stat-ing files on the executors."""

    def stat_all(frames: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for frame in frames:
            yield frame[["listing_id", "image_id", "position", "uri"]].assign(
                source_fingerprint=[photo_fingerprint(u, t) for u, t in zip(frame["uri"], frame["updated_at"])]
            )

    return images.select("listing_id", "image_id", "position", "uri", F.col("updated_at").cast("string")).mapInPandas(
        stat_all, FINGERPRINTED_SCHEMA
    )


def is_transient_error(error: Column) -> Column:
    return F.substring_index(error, ":", 1).isin(*sorted(photos.TRANSIENT_CODES))


@dataclass
class PhotoPlan:
    to_encode: DataFrame  # FINGERPRINTED_SCHEMA
    reordered: DataFrame  # listing_id, image_id, position
    removed: DataFrame  # listing_id, image_id


def plan_photos(fingerprinted: DataFrame, stored: DataFrame, listed: DataFrame, full_refresh: bool) -> PhotoPlan:
    """`listed`: listing_ids in the source. Photos of listings gone from the source stay until purged."""
    reusable = stored.where(~((F.col("status") == "error") & is_transient_error(F.col("error"))))
    if full_refresh:
        to_encode = fingerprinted
    else:
        to_encode = fingerprinted.join(
            reusable.select(*IMAGE_KEY, "source_fingerprint"), [*IMAGE_KEY, "source_fingerprint"], "left_anti"
        )
    reordered = (
        fingerprinted.join(to_encode.select(*IMAGE_KEY), IMAGE_KEY, "left_anti")
        .join(stored.select(*IMAGE_KEY, F.col("position").alias("stored_position")), IMAGE_KEY)
        .where(~F.col("position").eqNullSafe(F.col("stored_position")))
        .select(*IMAGE_KEY, "position")
    )
    removed = (
        stored.select(*IMAGE_KEY)
        .join(listed, "listing_id", "left_semi")
        .join(fingerprinted.select(*IMAGE_KEY), IMAGE_KEY, "left_anti")
    )
    return PhotoPlan(to_encode, reordered, removed)


def texts_to_encode(rendered: DataFrame, stored: DataFrame, full_refresh: bool) -> DataFrame:
    if full_refresh:
        return rendered
    return rendered.join(stored.select("listing_id", "text_hash"), ["listing_id", "text_hash"], "left_anti")


def kept_good_vectors(encoded: DataFrame, stored: DataFrame) -> DataFrame:
    """Encoded photo rows that failed transiently where an ok vector is stored: those keep the stored row."""
    stored_ok = stored.where(F.col("status") == "ok").select(*IMAGE_KEY)
    return encoded.where((F.col("status") == "error") & is_transient_error(F.col("error"))).join(
        stored_ok, IMAGE_KEY, "left_semi"
    )


def after_run(stored: DataFrame, upserts: DataFrame, removed: DataFrame | None, key: list[str]) -> DataFrame:
    """The rows a table will hold once this run's upserts and deletes are applied (vectors included)."""
    kept = stored.join(upserts.select(*key), key, "left_anti")
    if removed is not None:
        kept = kept.join(removed.select(*key), key, "left_anti")
    return kept.unionByName(upserts.select(*stored.columns))


def inputs_hash(texts: DataFrame, images: DataFrame, image_weight: float) -> DataFrame:
    """listing_id -> a hash of what fusion reads for it: its text row and its photo rows (as of this run)."""
    text_part = texts.select(
        "listing_id", F.concat_ws("|", "text_hash", "status", F.col("embedded_at").cast("string")).alias("text_part")
    )
    image_part = images.groupBy("listing_id").agg(
        F.array_join(
            F.array_sort(
                F.collect_list(F.concat_ws("|", "image_id", "status", F.col("embedded_at").cast("string")))
            ),
            ";",
        ).alias("image_part")
    )
    return text_part.join(image_part, "listing_id", "full").select(
        "listing_id",
        F.sha2(
            F.concat_ws("#", F.lit(f"w={image_weight}"), F.coalesce("text_part", F.lit("")), F.coalesce("image_part", F.lit(""))),
            256,
        ).alias("inputs_hash"),
    )


@dataclass
class ListingPlan:
    """Per listing (source or stored), what this run does to its fused row. `decisions` is small (no
    vectors) and read by all three tables' MERGE sources: persist it once."""

    decisions: DataFrame  # listing_id, status, is_active, inputs_hash, action (fuse / flip / deactivate / purge / null)

    @property
    def to_fuse(self) -> DataFrame:  # listing_id, status, inputs_hash
        return self.decisions.where(F.col("action") == "fuse").select("listing_id", "status", "inputs_hash")

    @property
    def flipped(self) -> DataFrame:  # listing_id, is_active: updated in place
        return self.decisions.where(F.col("action").isin("flip", "deactivate")).select("listing_id", "is_active")

    @property
    def purged(self) -> DataFrame:  # listing_id: every row deleted
        return self.decisions.where(F.col("action") == "purge").select("listing_id")


def plan_listings(
    listings: DataFrame,
    texts_after: DataFrame,
    images_after: DataFrame,
    stored: DataFrame,
    image_weight: float,
    full_refresh: bool,
    now: datetime,
    retention_days: int,
) -> ListingPlan:
    """Re-fuse what changed, flip is_active in place, deactivate what left the source, purge what left it
    more than the retention ago: one outer join of the source listings with the stored fused rows."""
    hashes = inputs_hash(texts_after, images_after, image_weight)
    desired = listings.select(
        "listing_id", "status", (~F.coalesce(F.lower("status").isin(*fusion.INACTIVE_STATUSES), F.lit(False))).alias("is_active"),
        F.lit(True).alias("listed"),
    ).join(hashes, "listing_id", "left")
    compared = desired.join(
        stored.select(
            "listing_id", F.col("inputs_hash").alias("stored_hash"), F.col("is_active").alias("stored_active"),
            F.col("updated_at").alias("stored_updated_at"),
        ),
        "listing_id",
        "full",
    )
    listed = F.col("listed").isNotNull()
    changed = F.col("stored_hash").isNull() | (F.col("stored_hash") != F.col("inputs_hash"))
    expired = F.col("stored_updated_at") < F.lit(now - timedelta(days=retention_days))
    action = (
        F.when(listed & (F.lit(full_refresh) | changed), "fuse")
        .when(listed & (F.col("is_active") != F.col("stored_active")), "flip")
        .when(~listed & F.col("stored_active"), "deactivate")
        .when(~listed & expired, "purge")
    )
    return ListingPlan(
        compared.select(
            "listing_id", "status", F.when(listed, F.col("is_active")).otherwise(F.lit(False)).alias("is_active"),
            "inputs_hash", action.alias("action"),
        )
    )
