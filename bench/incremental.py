"""How much cheaper an incremental rerun is than the full run it follows (run by hand; prints figures).

    python bench/incremental.py --listings 5000 --change 0.01 [--model ViT-B-32] [--photo-size sample|480x600]

Builds a synthetic catalogue, runs the job once over everything (cold tables), changes a share of the
listings (a new description, and a replaced photo for every other one), reruns, then reruns once more
with no change. Spark session start is excluded; the model (seeded random weights: same cost as real
ones) is built inside each run, as in production.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from depop_embed import config, pipeline  # noqa: E402
from depop_embed.sample_catalogue import write_catalogue  # noqa: E402
from depop_embed.session import get_spark  # noqa: E402


def change_listings(src: Path, share: float, seed: int) -> tuple[int, int]:
    """Edit the description of `share` of the listings; replace the first photo of every other one."""
    listings = [json.loads(line) for line in (src / "listings.jsonl").read_text().splitlines()]
    photos = [json.loads(line) for line in (src / "listing_images.jsonl").read_text().splitlines()]
    first_photo = {}
    for p in photos:
        first_photo.setdefault(p["listing_id"], p)
    rng = random.Random(seed)
    chosen = rng.sample(listings, max(1, round(share * len(listings))))
    replaced = 0
    for i, listing in enumerate(chosen):
        listing["description"] = f"{listing['description'] or ''} Reduced, bundle for 20% off."
        photo = first_photo.get(listing["listing_id"])
        if i % 2 == 0 and photo:
            donor = rng.choice(photos)
            shutil.copyfile(src / donor["uri"], src / photo["uri"])
            replaced += 1
    (src / "listings.jsonl").write_text("".join(json.dumps(r) + "\n" for r in listings))
    return len(chosen), replaced


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listings", type=int, default=5000)
    parser.add_argument("--change", type=float, default=0.01, help="share of listings changed before the rerun")
    parser.add_argument("--model", default="ViT-B-32", help="open_clip architecture (seeded random weights)")
    parser.add_argument("--max-photos", type=int, default=4, help="photos per listing: 1 to this (the sample's 4)")
    parser.add_argument("--photo-size", default="sample", help="WxH of every photo, or `sample`: the sample's mix of sizes and formats")
    parser.add_argument("--workdir", help="keep the catalogue and tables here (default: a temp dir)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="depop-bench-incremental-"))
    size = None if args.photo_size == "sample" else tuple(int(v) for v in args.photo_size.split("x"))
    catalogue = write_catalogue(work / "src", n_listings=args.listings, seed=1, max_photos=args.max_photos, photo_size=size)
    cfg = config.load(ROOT / "conf" / "local.yaml", [
        f"listings.path={catalogue.listings_path}", f"images.path={catalogue.images_path}",
        f"output.location={work / 'tables'}", f"model.name={args.model}", "model.seed=0", *args.overrides,
    ])
    spark = get_spark(cfg)
    spark.sparkContext.setLogLevel("ERROR")
    print(f"catalogue: {catalogue.n_listings} listings, {catalogue.n_photos} photos ({args.photo_size}); "
          f"model {args.model}; Spark {spark.sparkContext.master}; work dir {work}")

    def timed(label: str) -> float:
        started = time.monotonic()
        summary = pipeline.run(spark, cfg)
        elapsed = time.monotonic() - started
        changes = {name: t.changes for name, t in summary.tables.items()}
        print(f"{label:<22} {elapsed:8.1f}s  encoded {summary.stats.get('texts', 0)} texts, "
              f"{summary.stats.get('images', 0)} photos; changes {changes}")
        return elapsed

    full = timed("full run")
    edited, replaced = change_listings(catalogue.listings_path.parent, args.change, seed=2)
    print(f"changed {edited} listings ({args.change:.1%}): {edited} descriptions, {replaced} photos replaced")
    incremental = timed("incremental rerun")
    unchanged = timed("rerun, no change")
    print(f"incremental / full = {incremental / full:.3f} (target <= 0.05); no-change / full = {unchanged / full:.3f}")
    spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
