"""The host's CPU cost per photo, one thread: the job's host path against the draft-decode floor and
against open_clip's own reference, on 800x1000 JPEGs.

    python bench/host_cost.py [--photos 200] [--rounds 5] [--model ViT-B-32]   # about a minute here

Every step runs over the same photos (bytes already in memory, so the disk is out of it), one thread,
`--rounds` times interleaved; the best round of each counts (the machine is shared: a slower round
is someone else's work). Steps:

  floor            Pillow opens the bytes and decodes them at the job's draft scale: the least any
                   path that decodes on the host can do
  job host path    what the job's decode threads do per photo: sha256 of the bytes (content_hash), the
                   header checks, the draft decode, EXIF orientation, RGB, uint8 array
                   (`Encoder.load_photo`); resize and normalise are the device's (`photo_input`)
  device JPEG      the host's part with encode.device_jpeg_decode: sha256 and the header checks only
  previous job     the job before this split: draft decode, then open_clip's transform on the host
  reference        open_clip's own: full Pillow decode + its transform (bicubic resize on the host)
  device half, CPU `photo_input` on the CPU in batches of 32 (on a CPU-only run it is host work too)

Then the parity of the job's vectors with the reference's over `--parity` of the photos (target >= 0.9999).
"""

from __future__ import annotations

import argparse
import io
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from depop_embed import encoders, photos
from depop_embed.config import EncodeConfig, ModelConfig
from throughput import PHOTO_SIZE, ensure_catalogue

ROOT = Path(__file__).resolve().parents[1]
CAP = EncodeConfig.max_image_pixels
TARGET_MS, TARGET_FLOOR_RATIO, PARITY = 1.5, 1.4, 0.9999


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--parity", type=int, default=48, help="photos whose vectors are compared")
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--work", default=str(ROOT / ".depop_embed" / "bench"))
    args = parser.parse_args()

    catalogue = ensure_catalogue(Path(args.work) / "catalogue-host-cost", max(1, round(args.photos / 2.44 * 1.1)))
    paths = sorted((catalogue.listings_path.parent / "photos").rglob("*.jpg"))[: args.photos]
    datas = [p.read_bytes() for p in paths]
    torch.set_num_threads(1)
    encoder = encoders.build_encoder(ModelConfig(name=args.model, seed=0), "cpu")
    side = encoder.image_side
    draft_size = photos.decode(datas[0], CAP, side).size

    def floor(data):
        image = Image.open(io.BytesIO(data))
        image.draft("RGB", (int(np.ceil(photos.DRAFT_MARGIN * side)),) * 2)
        image.load()

    def job(data):
        photos.content_hash(data)
        encoder.load_photo(data, CAP)

    def device_jpeg(data):
        photos.content_hash(data)
        assert isinstance(encoder.load_photo(data, CAP, device_jpeg=True), photos.DeviceJpeg)

    def previous(data):
        photos.content_hash(data)
        encoder.preprocess(photos.decode(data, CAP, side))

    def reference(data):
        encoder.preprocess(Image.open(io.BytesIO(data)).convert("RGB"))

    steps = {"floor (draft decode)": floor, "job host path": job, "device JPEG, host part": device_jpeg,
             "previous job path": previous, "open_clip reference": reference}
    best = {name: float("inf") for name in [*steps, "device half on the CPU"]}
    loaded = [encoder.load_photo(d, CAP) for d in datas]
    load_before = os.getloadavg()[0]
    for _ in range(args.rounds):
        for name, step in steps.items():
            best[name] = min(best[name], seconds(lambda: [step(d) for d in datas]))
        best["device half on the CPU"] = min(best["device half on the CPU"], seconds(
            lambda: [encoder.photo_input(loaded[i : i + 32]) for i in range(0, len(loaded), 32)]))
    load = (load_before + os.getloadavg()[0]) / 2

    ms = {name: 1000 * s / len(datas) for name, s in best.items()}
    print(f"{len(datas)} JPEGs {PHOTO_SIZE[0]}x{PHOTO_SIZE[1]} (mean {np.mean([len(d) for d in datas]) / 1000:.0f} KB), "
          f"{args.model} input {side}px, draft decode to {draft_size[0]}x{draft_size[1]}; one thread, best of "
          f"{args.rounds} rounds; load {load:.1f} on {os.cpu_count()} CPUs")
    for name, value in ms.items():
        print(f"  {name:26} {value:6.2f} ms/photo/core  ({1000 / value:6.0f} photos/s/core)")
    job_ms, floor_ms = ms["job host path"], ms["floor (draft decode)"]
    print(f"job host path: {job_ms:.2f} ms (target <= {TARGET_MS}: {verdict(job_ms <= TARGET_MS)}); "
          f"x{job_ms / floor_ms:.2f} the floor (target <= {TARGET_FLOOR_RATIO}: {verdict(job_ms / floor_ms <= TARGET_FLOOR_RATIO)}); "
          f"previous job path / job: x{ms['previous job path'] / job_ms:.2f}; reference / job: x{ms['open_clip reference'] / job_ms:.2f}")
    print(f"CPU-only run, host + device half: {job_ms + ms['device half on the CPU']:.2f} ms/photo/core "
          f"(previous: {ms['previous job path']:.2f})")

    torch.set_num_threads(os.cpu_count() or 1)
    sample = datas[: args.parity]
    ours = encoder.encode_images(encoder.photo_input([encoder.load_photo(d, CAP) for d in sample]))
    device = encoder.encode_images(encoder.photo_input([encoder.load_photo(d, CAP, device_jpeg=True) for d in sample]))
    ref = encoder.encode_images(torch.stack([encoder.preprocess(photos.decode(d, CAP)) for d in sample]))
    for name, vectors in (("job path", ours), ("device JPEG decode (CPU variant)", device)):
        cosine = (vectors * ref).sum(axis=1)
        print(f"parity, {name} vs open_clip on the full decode, {len(sample)} photos: cosine min {cosine.min():.6f}, "
              f"mean {cosine.mean():.6f} (target >= {PARITY}: {verdict(cosine.min() >= PARITY)})")


def seconds(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


if __name__ == "__main__":
    main()
