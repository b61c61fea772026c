"""Reading the sources: duplicates, rows without keys and photos of unknown listings are left out,
deterministically, and counted."""

from __future__ import annotations

import json
from pathlib import Path

from depop_embed import sources
from depop_embed.config import LISTING_COLUMNS

from conftest import make_config

T1, T2, T3 = "2026-10-01T10:00:00+00:00", "2026-10-02T10:00:00+00:00", "2026-10-03T10:00:00+00:00"


def listing(listing_id, title, updated_at):
    return {**dict.fromkeys(LISTING_COLUMNS), "listing_id": listing_id, "title": title, "updated_at": updated_at}


def photo(listing_id, image_id, uri, updated_at=T1):
    return {"listing_id": listing_id, "image_id": image_id, "position": 0, "uri": uri, "updated_at": updated_at}


LISTINGS = [
    listing("L1", "old", T1), listing("L1", "newest", T3), listing("L1", "middle", T2),
    listing("L2", "tie a", T2), listing("L2", "tie b", T2),  # same updated_at: the pick must not depend on order
    listing("L3", "dated", T1), listing("L3", "undated", None),  # a row with a time beats one without
    listing(None, "no id", T3),
    listing("L4", "only", T1),
]
PHOTOS = [
    photo("L1", "p1", "old.jpg", T1), photo("L1", "p1", "new.jpg", T2),
    photo("L1", "p2", "/abs/p2.jpg"),
    photo("L2", "p1", "s3://bucket/p.jpg"),
    photo("L2", "p2", ""), photo("L2", "p3", None),  # no uri: kept, to become 'missing' error rows
    photo("L9", "p1", "orphan.jpg"), photo("L9", "p2", "orphan2.jpg"),  # no such listing
    photo("L1", None, "no-image-id.jpg"), photo(None, "p7", "no-listing-id.jpg"),
]


def write(tmp: Path, listings: list[dict], photos: list[dict]) -> tuple[Path, Path]:
    tmp.mkdir(parents=True)
    paths = tmp / "listings.jsonl", tmp / "photos" / "listing_images.jsonl"
    paths[1].parent.mkdir()
    for path, rows in zip(paths, (listings, photos)):
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return paths


def read(spark, tmp: Path, listings: list[dict], photos: list[dict]) -> sources.Sources:
    listings_path, images_path = write(tmp, listings, photos)
    return sources.read(spark, make_config(tmp, listings=listings_path, images=images_path), "delta-rs")


def test_latest_rows_are_kept_and_the_rest_counted(spark, tmp_path):
    src = read(spark, tmp_path / "a", LISTINGS, PHOTOS)
    titles = {r["listing_id"]: r["title"] for r in src.listings.collect()}
    assert set(titles) == {"L1", "L2", "L3", "L4"}
    assert titles["L1"] == "newest" and titles["L3"] == "dated" and titles["L2"] in ("tie a", "tie b")
    photos = {(r["listing_id"], r["image_id"]): r["uri"] for r in src.images.collect()}
    root = str(tmp_path / "a" / "photos")
    assert photos == {
        ("L1", "p1"): f"{root}/new.jpg", ("L1", "p2"): "/abs/p2.jpg", ("L2", "p1"): "s3://bucket/p.jpg",
        ("L2", "p2"): "", ("L2", "p3"): None,
    }
    assert src.counts == {
        "listings_read": 9, "listings_duplicate": 4, "listings_without_key": 1,
        "photos_read": 10, "photos_duplicate": 1, "photos_without_key": 2, "photos_without_listing": 2,
    }
    assert "9 listing rows read, 4 older duplicates and 1 without listing_id left out" in sources.describe_counts(src.counts)
    src.unpersist()


def test_ties_are_broken_the_same_way_whatever_the_row_order(spark, tmp_path):
    picks = set()
    for i, order in enumerate([LISTINGS, LISTINGS[::-1]]):
        src = read(spark, tmp_path / str(i), order, PHOTOS)
        picks.add(src.listings.where("listing_id = 'L2'").first()["title"])
        src.unpersist()
    assert len(picks) == 1
