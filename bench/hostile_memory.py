"""Peak memory on huge and bomb photos: what decoding costs with the pixel cap, and without it.

    python bench/hostile_memory.py            # each case decoded in a fresh process: peak RSS growth
    python bench/hostile_memory.py --job      # also: peak RSS of the Spark Python workers over a job run
                                              # on the hostile test corpus, with the cap and without it

Run by hand; it prints figures and asserts nothing. The decode figures are each a fresh interpreter's
peak RSS (VmHWM) after decoding, minus its RSS before; the job figures are the largest VmHWM of
the run's Python workers (one fresh Spark session per variant).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import hostile_corpus as hostile  # noqa: E402

CAP = 4_000_000  # encode.max_image_pixels for the decode figures: a 12 MP phone photo fits 1/2-scale
CASES = {
    "png_bomb_10000x8000": lambda: hostile.png(10000, 8000, 8, 2, (bytes(30000) for _ in range(8000))),
    "gif_bomb_8000x8000": lambda: hostile.gif_bomb(8000),
    "webp_bomb_12000x12000": lambda: hostile.webp_bomb(12000),
    "jpeg_8000x6000": lambda: hostile.huge_jpeg(8000, 6000),
    "jpeg_4000x3000": lambda: hostile.huge_jpeg(4000, 3000),
    "png_20000x1": lambda: hostile.png(20000, 1, 8, 2, [bytes(60000)]),
}
PREPROCESSED = {"png_20000x1"}  # measured through open_clip's ViT-B-32 transform too: that is where it blows up
# VmHWM/VmRSS, not ru_maxrss: a child's ru_maxrss starts at its forked parent's peak (it survives exec).
_MEASURE = textwrap.dedent("""
    import io, sys
    from PIL import Image
    from depop_embed.photos import PhotoError, decode
    def status_mb(key):
        return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) / 1024
    data = open(sys.argv[1], "rb").read()
    mode, cap, preprocess = sys.argv[2], int(sys.argv[3]), sys.argv[4] == "preprocess"
    if preprocess:
        import open_clip
        transform = open_clip.image_transform(224, is_train=False)  # ViT-B-32's eval transform, no model built
    open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM: measure from here
    before = status_mb("VmRSS")
    try:
        if mode == "depop":
            image = decode(data, cap)
        else:  # what a plain Pillow decode would cost: no cap, Pillow's own guard lifted
            Image.MAX_IMAGE_PIXELS = None
            image = Image.open(io.BytesIO(data)).convert("RGB")
        result = "%dx%d" % image.size
        if preprocess:
            transform(image)
    except PhotoError as exc:
        result = exc.code
    print(result, status_mb("VmHWM") - before)
""")


def decode_figures() -> None:
    print(f"decode, encode.max_image_pixels={CAP:,}: peak RSS growth of a fresh process ({', '.join(PREPROCESSED)}: decode + open_clip ViT-B-32 transform)")
    print(f"{'case':24} {'file bytes':>11} {'depop decode':>26} {'plain Pillow decode':>28}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, build in CASES.items():
            path = Path(tmp) / name
            path.write_bytes(build())
            cells = []
            for mode in ("depop", "plain"):
                step = "preprocess" if name in PREPROCESSED else "decode"
                out = subprocess.run([sys.executable, "-c", _MEASURE, str(path), mode, str(CAP), step],
                                     capture_output=True, text=True, check=True).stdout.split()
                cells.append(f"{out[0]}, +{float(out[1]):.0f} MB")
            print(f"{name:24} {path.stat().st_size:>11,} {cells[0]:>26} {cells[1]:>28}")


def job_figures() -> None:
    print("\njob over the hostile test corpus (local[2], tiny model): peak RSS (VmHWM) of the largest Python worker")
    with tempfile.TemporaryDirectory() as tmp:
        for label, cap in (("encode.max_image_pixels=2,000,000 (the corpus run)", hostile.MAX_IMAGE_PIXELS),
                           ("encode.max_image_pixels=1,000,000,000 (cap lifted)", 1_000_000_000)):
            out = subprocess.run([sys.executable, __file__, "--job-variant", str(cap), str(Path(tmp) / str(cap))],
                                 capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            print(f"  {label}: {out}")


def job_variant(cap: int, tmp: Path) -> None:
    """One job run in this process's own Spark session; prints its workers' peak RSS."""
    from photo_server import PhotoServer

    from depop_embed import config, pipeline
    from depop_embed.session import get_spark
    from conftest import job_overrides

    server = PhotoServer()
    corpus = hostile.write_corpus(tmp / "src", server)
    cfg = config.load(ROOT / "conf" / "local.yaml", [
        *job_overrides(tmp, corpus.listings_path, corpus.images_path),
        f"encode.max_image_pixels={cap}", f"images.fetch.max_bytes={hostile.MAX_BYTES}",
        f"images.allowed_uri_prefixes={hostile.allowed_prefixes(corpus, server)}",
        "images.fetch.allow_private_networks=true",
        "images.fetch.timeout_s=0.5", "images.fetch.backoff_s=0.05", "thresholds.max_error_rate=1",
    ])
    spark = get_spark(cfg)
    summary = pipeline.run(spark, cfg)
    # The Python workers (forked from pyspark.daemon, same command line); not the JVM.
    workers = [pid for pid in _descendants(os.getpid()) if b"pyspark.daemon" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    peak = max(_vm_hwm_mb(pid) for pid in workers)
    errors = summary.tables["listing_image_embeddings"].errors
    spark.stop()
    server.close()
    print(f"{peak:.0f} MB over {len(workers)} Python processes; {errors} photo error rows")


def _descendants(pid: int) -> list[int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                status = (entry / "status").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(status.split("PPid:")[1].split()[0])
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def _vm_hwm_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", action="store_true", help="also measure job runs over the hostile corpus")
    parser.add_argument("--job-variant", nargs=2, metavar=("CAP", "TMP"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job_variant:
        job_variant(int(args.job_variant[0]), Path(args.job_variant[1]))
    else:
        decode_figures()
        if args.job:
            job_figures()
