"""A deterministic synthetic catalogue: listings, listing photos, and real image files on disk.

It produces the shipped sample data (`sample_data/`), and the larger catalogues that tests and
benchmarks need. Photos are drawn garments (a silhouette per category, in the listing's colour, on a
textured background) saved as JPEG and PNG in several sizes and modes, so the job reads and decodes
them exactly like production uploads.

    python -m depop_embed.sample_catalogue sample_data --listings 200
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

CATEGORIES = ("t-shirt", "hoodie", "jeans", "dress", "jacket", "trainers", "skirt", "bag")
BRANDS = ("Nike", "Adidas", "Levi's", "Zara", "Carhartt", "Ralph Lauren", "Dr. Martens", "Stüssy", "Vintage", None)
COLOURS = {
    "black": (25, 25, 28), "navy": (24, 38, 84), "red": (178, 34, 40), "green": (46, 112, 64),
    "cream": (236, 226, 200), "pink": (232, 150, 180), "grey": (130, 130, 135), "brown": (116, 78, 50),
}
CONDITIONS = ("new with tags", "like new", "good", "fair")
SIZES = ("XS", "S", "M", "L", "XL", "UK 8", "UK 10", "UK 12", "W32 L32")
# (width, height, weight): mostly phone-like portrait photos, a few large and square ones.
PHOTO_SIZES = ((240, 300, 4), (320, 400, 6), (480, 600, 5), (640, 800, 3), (800, 1000, 1), (400, 400, 2), (1080, 1350, 1))
# (format, mode, weight): RGB JPEG dominates; also greyscale JPEG, RGB/RGBA/palette PNG.
PHOTO_KINDS = (("JPEG", "RGB", 12), ("JPEG", "L", 1), ("PNG", "RGB", 2), ("PNG", "RGBA", 1), ("PNG", "P", 1))
BASE_TIME = datetime(2026, 10, 1, tzinfo=timezone.utc)


@dataclass(frozen=True)
class Catalogue:
    listings_path: Path
    images_path: Path
    n_listings: int
    n_photos: int


def write_catalogue(
    out: str | Path,
    n_listings: int = 200,
    seed: int = 7,
    max_photos: int = 4,
    photo_size: tuple[int, int] | None = None,
    photo_kinds: tuple = PHOTO_KINDS,
    max_photo_files: int | None = None,
) -> Catalogue:
    """Write listings.jsonl, listing_images.jsonl and photos/ under `out`; same arguments, same bytes.

    `photo_size` and `photo_kinds` pin what photos are drawn (benchmarks: 800x1000 RGB JPEGs only).
    `max_photo_files` caps the photo files drawn; later photo rows point at those files in turn, so a
    catalogue of many listings costs little to write.
    """
    rng = random.Random(seed)
    out = Path(out)
    (out / "photos").mkdir(parents=True, exist_ok=True)
    listings, images, files = [], [], []
    for n in range(n_listings):
        listing = _listing(rng, n)
        listings.append(listing)
        # Every 40th listing has no photo, so a catalogue of 200 has at least 5 of them.
        count = 0 if n % 40 == 7 else rng.randint(1, max_photos)
        for position in range(count):
            if max_photo_files is not None and len(files) >= max_photo_files:
                name = files[len(images) % max_photo_files]
            else:
                fmt, mode = _weighted(rng, photo_kinds)
                size = photo_size or _weighted(rng, PHOTO_SIZES)
                name = f"photos/{listing['listing_id']}_{position + 1}.{'jpg' if fmt == 'JPEG' else 'png'}"
                image, garment = _photo(rng, listing, size)
                _save(image, garment, out / name, fmt, mode)
                files.append(name)
            images.append({
                "listing_id": listing["listing_id"],
                "image_id": f"{listing['listing_id']}-{position + 1}",
                "position": position,
                "uri": name,
                "updated_at": listing["updated_at"],
            })
    listings_path, images_path = out / "listings.jsonl", out / "listing_images.jsonl"
    _write_jsonl(listings_path, listings)
    _write_jsonl(images_path, images)
    return Catalogue(listings_path, images_path, len(listings), len(images))


def _listing(rng: random.Random, n: int) -> dict:
    category = rng.choice(CATEGORIES)
    brand = rng.choice(BRANDS)
    colour = rng.choice(list(COLOURS))
    condition = rng.choice(CONDITIONS)
    size = rng.choice(SIZES)
    title = f"{brand + ' ' if brand else ''}{colour} {category}"
    description = rng.choice((
        f"{condition.capitalize()} {colour} {category}, size {size}. Smoke-free home, fast shipping.",
        f"Lovely {category} from {brand or 'a small label'}. Worn a handful of times, no flaws ✨ #y2k #vintage",
        f"{title} – fits true to size. Measurements on request. Bundle to save!",
    ))
    if n % 25 == 3:  # a few listings have no description at all, as on the real site
        description = None if n % 50 == 3 else ""
    return {
        "listing_id": f"L{n + 1:06d}",
        "title": title.capitalize(),
        "description": description,
        "brand": brand,
        "category": category,
        "size": size,
        "condition": condition,
        "colour": colour,
        "price": round(rng.uniform(4, 180), 2),
        "currency": "GBP",
        "status": "sold" if rng.random() < 0.08 else "active",
        "updated_at": (BASE_TIME + timedelta(minutes=rng.randint(0, 30 * 24 * 60))).isoformat(),
    }


def _photo(rng: random.Random, listing: dict, size: tuple[int, int]) -> tuple[Image.Image, Image.Image]:
    """The photo, and a mask of the garment in it (for the transparent-background PNGs)."""
    w, h = size
    background = tuple(rng.randint(170, 250) for _ in range(3))
    image = Image.new("RGB", (w, h), background)
    draw = ImageDraw.Draw(image)
    for _ in range(6):  # soft background texture: a few faint blobs
        x, y, r = rng.randint(0, w), rng.randint(0, h), rng.randint(w // 8, w // 3)
        shade = tuple(max(0, c - rng.randint(5, 25)) for c in background)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=shade)
    image = image.filter(ImageFilter.GaussianBlur(radius=max(2, w // 40)))
    draw = ImageDraw.Draw(image)
    colour = tuple(min(255, max(0, c + rng.randint(-15, 15))) for c in COLOURS[listing["colour"]])
    cx, cy = w / 2 + rng.uniform(-w, w) * 0.05, h / 2 + rng.uniform(-h, h) * 0.05
    s = min(w, h) * rng.uniform(0.32, 0.42)
    garment = Image.new("L", (w, h), 0)
    mask = ImageDraw.Draw(garment)
    for shape in _silhouette(listing["category"], cx, cy, s):
        draw.polygon(shape, fill=colour, outline=tuple(max(0, c - 40) for c in colour))
        mask.polygon(shape, fill=255)
    return image, garment


def _silhouette(category: str, cx: float, cy: float, s: float) -> list[list[tuple[float, float]]]:
    def pts(*xy):
        return [(cx + x * s, cy + y * s) for x, y in xy]

    if category in ("t-shirt", "hoodie", "jacket"):
        sleeve = 1.1 if category == "t-shirt" else 1.5
        body = pts((-0.6, -0.9), (0.6, -0.9), (0.6, 1.0), (-0.6, 1.0))
        arms = pts((-0.6, -0.9), (-0.6 - sleeve * 0.5, -0.2 + sleeve * 0.3), (-0.6 - sleeve * 0.3, -0.05 + sleeve * 0.4), (-0.6, -0.3))
        arms2 = [(2 * cx - x, y) for x, y in arms]
        return [body, arms, arms2]
    if category in ("jeans",):
        return [pts((-0.6, -1), (0.6, -1), (0.7, 1), (0.1, 1), (0, -0.2), (-0.1, 1), (-0.7, 1))]
    if category in ("dress", "skirt"):
        top = -1 if category == "dress" else -0.4
        return [pts((-0.3, top), (0.3, top), (0.8, 1), (-0.8, 1))]
    if category == "trainers":
        return [pts((-1, 0.1), (0.2, 0.1), (0.9, 0.4), (1, 0.7), (-1, 0.7)), pts((-1, 0.1), (-0.5, -0.3), (0.1, -0.2), (0.2, 0.1))]
    return [pts((-0.8, -0.3), (0.8, -0.3), (0.7, 0.9), (-0.7, 0.9)), pts((-0.4, -0.3), (-0.3, -0.8), (0.3, -0.8), (0.4, -0.3), (0.25, -0.3), (0.2, -0.65), (-0.2, -0.65), (-0.25, -0.3))]


def _save(image: Image.Image, garment: Image.Image, path: Path, fmt: str, mode: str) -> None:
    if mode == "L":
        image = image.convert("L")
    elif mode == "P":
        image = image.quantize(colors=64)
    elif mode == "RGBA":
        # Transparent background, opaque garment: the pipeline composites it on white.
        image = image.copy()
        image.putalpha(garment)
    if fmt == "JPEG":
        image.save(path, "JPEG", quality=85)
    else:
        image.save(path, "PNG", optimize=True)


def _weighted(rng: random.Random, options):
    return rng.choices(options, weights=[o[-1] for o in options])[0][:-1]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="folder to write listings.jsonl, listing_images.jsonl and photos/ into")
    parser.add_argument("--listings", type=int, default=200)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    catalogue = write_catalogue(args.out, args.listings, args.seed)
    print(f"wrote {catalogue.n_listings} listings and {catalogue.n_photos} photos under {args.out}")


if __name__ == "__main__":
    main()
