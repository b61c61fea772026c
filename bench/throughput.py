"""Throughput of the embedding job against three baselines, and its memory against catalogue size.

    python bench/throughput.py                  # 7 to 9 minutes on a 2-core CPU
    python bench/throughput.py --photos 5000 --sample 1200 --set encode.image_batch_size=64

One run, one machine, one model (ViT-B-32 with seeded random weights: the cost of real weights), the
same batch sizes and thread count throughout:

  (a) a bare open_clip loop in this process: read, decode, preprocess, encode (the model's own cost);
  (b) the Spark job end to end, `pipeline.run` over the whole catalogue (session started beforehand);
  (c) a naive pandas UDF that builds the model for every Arrow batch of one model batch;
  (d) the same work through `pyspark.ml.functions.predict_batch_udf` (model built once per worker,
      before timing).

(a), (c) and (d) run over the first `--sample` photos and `--text-sample` listing texts; (b) over the
whole catalogue (>= 2,000 photos). Then, in a fresh process per size, the peak resident memory
(VmHWM) of the driver, the JVM and every Python worker for `--memory-listings` (default 1k and 10k
listings) with `--memory-model` (default: the tiny test architecture, since 10k listings through
ViT-B-32 would take hours on a CPU; the pipeline's memory does not depend on the model's cost).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd

from depop_embed import config, encoders, listing_text, photos, pipeline
from depop_embed.sample_catalogue import write_catalogue
from depop_embed.session import get_spark

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = ROOT / "tests" / "assets" / "depop-tiny-clip.json"
PHOTO_SIZE = (800, 1000)  # a phone photo, portrait
PHOTOS_PER_LISTING = 2.44  # the catalogue's mean: 1-4 photos, none for one listing in 40
MEMORY_PHOTO_FILES = 200  # memory catalogues point their photo rows at this many files in turn


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.memory_run:
        print(json.dumps(memory_run(args, args.memory_run)))
        return
    work = Path(args.work)
    started = time.monotonic()
    # A little over photos / mean photos per listing, so the catalogue has at least --photos photos.
    n_listings = math.ceil(1.05 * args.photos / PHOTOS_PER_LISTING)
    catalogue, catalogue_s = timed(lambda: ensure_catalogue(work / f"catalogue-{args.photos}", n_listings))
    cfg = bench_config(args, catalogue, work / "tables", args.overrides)
    listings = pd.read_json(catalogue.listings_path, lines=True)
    images = pd.read_json(catalogue.images_path, lines=True)
    uris = [str(catalogue.listings_path.parent / uri) for uri in images["uri"]]
    texts = listing_text.render_frame(listings, cfg.text)["text"].tolist()
    titles = listings["title"].tolist()
    print(f"catalogue: {len(listings)} listings, {len(uris)} photos ({PHOTO_SIZE[0]}x{PHOTO_SIZE[1]} JPEG) "
          f"under {catalogue.listings_path.parent} ({catalogue_s:.0f}s)", flush=True)

    spark = get_spark(cfg)
    spark.sparkContext.setLogLevel("ERROR")
    settings = pipeline._encode_settings(spark, cfg, cfg.model, None)  # exactly what the job gives its workers
    tasks = spark.sparkContext.defaultParallelism // int(spark.conf.get("spark.task.cpus", "1"))
    threads = tasks * settings.torch_threads
    print(f"model {cfg.model.name} (seed {cfg.model.seed}); Spark {spark.sparkContext.master}: {tasks} tasks x "
          f"{settings.torch_threads} torch threads; bare loop: {threads} torch threads; batches of "
          f"{settings.image_batch_size} photos / {settings.text_batch_size} texts, Arrow batches of "
          f"{cfg.encode.arrow_batch_size}; JPEG draft decode {'on' if settings.jpeg_draft else 'off'}", flush=True)

    sample, text_sample = uris[: args.sample], texts[: args.text_sample]
    rows, loads = {}, {}
    with MachineLoad() as loads["a"]:
        rows["a"], extras = bare_loop(settings, threads, sample, texts, titles[: args.text_sample], text_sample)
    with MachineLoad() as loads["b"], PeakRss() as b_peaks:
        rows["b"] = spark_job(spark, cfg)
    with MachineLoad() as loads["c"]:
        rows["c"] = naive_udf(spark, cfg, settings, sample, text_sample)
    with MachineLoad() as loads["d"]:
        rows["d"] = predict_batch(spark, cfg, settings, sample, text_sample)
    for key, load in loads.items():
        rows[key]["load"] = load.mean
    report(rows, extras, b_peaks.by_role, cfg)

    spark.stop()
    memory = [memory_subprocess(args, n) for n in args.memory_listings]
    report_memory(memory, args)
    print(f"\nbench done in {(time.monotonic() - started) / 60:.1f} min", flush=True)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=2000, help="photos in the catalogue that (b) embeds")
    parser.add_argument("--sample", type=int, default=480, help="photos for (a), (c) and (d)")
    parser.add_argument("--text-sample", type=int, default=256, help="texts for the full 77-token passes, (c), (d)")
    parser.add_argument("--memory-listings", type=int, nargs="*", default=[1000, 10000])
    parser.add_argument("--memory-model", choices=("tiny", "same"), default="tiny",
                        help="tiny: the test architecture; same: the model of the throughput runs")
    parser.add_argument("--work", default=str(ROOT / ".depop_embed" / "bench"), help="catalogues and tables")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every run, e.g. --set encode.image_batch_size=64")
    parser.add_argument("--memory-run", type=int, default=0, help=argparse.SUPPRESS)  # the child process
    return parser.parse_args(argv)


def ensure_catalogue(out: Path, n_listings: int, max_photo_files: int | None = None):
    """A catalogue of 800x1000 RGB JPEGs, written once and reused by later runs."""
    stamp = out / "catalogue.json"
    wanted = {"listings": n_listings, "max_photo_files": max_photo_files}
    if not stamp.exists() or json.loads(stamp.read_text()) != wanted:
        shutil.rmtree(out, ignore_errors=True)
        write_catalogue(out, n_listings, seed=7, photo_size=PHOTO_SIZE, photo_kinds=(("JPEG", "RGB", 1),),
                        max_photo_files=max_photo_files)
        stamp.write_text(json.dumps(wanted))
    from depop_embed.sample_catalogue import Catalogue

    n = sum(1 for _ in open(out / "listing_images.jsonl"))
    return Catalogue(out / "listings.jsonl", out / "listing_images.jsonl", n_listings, n)


def bench_config(args, catalogue, tables: Path, overrides) -> config.Config:
    shutil.rmtree(tables, ignore_errors=True)
    return config.load(ROOT / "conf" / "local.yaml", [
        f"listings.path={catalogue.listings_path}",
        f"images.path={catalogue.images_path}",
        f"output.location={tables}",
        "model.name=ViT-B-32", "model.seed=0",
        *overrides,
    ])


# (a) ---------------------------------------------------------------------------------------------

def bare_loop(settings, threads: int, uris: list[str], texts: list[str], titles: list[str], text_sample: list[str]):
    """open_clip's own objects in a plain loop; also the text-bucketing and decode comparisons."""
    import torch
    from PIL import Image

    torch.set_num_threads(threads)
    encoder, build_s = timed(lambda: encoders.build_encoder(settings.model, "cpu"))
    model, preprocess, tokenizer = encoder.model, encoder.preprocess, encoder.tokenizer

    def encode_photos():
        vectors = []
        for batch in chunks(uris, settings.image_batch_size):
            pixels = torch.stack([preprocess(Image.open(uri).convert("RGB")) for uri in batch])
            with torch.inference_mode():
                vectors.append(torch.nn.functional.normalize(model.encode_image(pixels), dim=-1).numpy())
        return np.concatenate(vectors)

    def full_pass(batch_texts):
        with torch.inference_mode():
            for batch in chunks(batch_texts, settings.text_batch_size):
                model.encode_text(tokenizer(batch))

    def bucketed(batch_texts):
        for batch in chunks(batch_texts, settings.text_batch_size):
            encoder.encode_texts(batch)

    print(f"(a) bare loop: model built in {build_s:.1f}s; {len(uris)} photos ...", flush=True)
    reference, photos_s = timed(encode_photos)
    print(f"(a) {len(uris) / photos_s:.2f} photos/s; the model alone on the same photos ...", flush=True)
    # The model's own cost: the same photos already decoded and preprocessed, in the same batches.
    preprocessed = [torch.stack([preprocess(Image.open(uri).convert("RGB")) for uri in batch])
                    for batch in chunks(uris, settings.image_batch_size)]
    with torch.inference_mode():
        _, model_s = timed(lambda: [model.encode_image(pixels) for pixels in preprocessed])
    del preprocessed
    print(f"(m) {len(uris) / model_s:.2f} photos/s; texts ...", flush=True)
    _, texts_s = timed(lambda: bucketed(texts))
    extras = {"model_build_s": build_s, "threads": threads, "model_alone": len(uris) / model_s}
    for name, sample in (("titles", titles), ("listing texts", text_sample)):
        _, full_s = timed(lambda: full_pass(sample))
        _, cut_s = timed(lambda: bucketed(sample))
        needed = encoder.text_cut.needed_lengths(tokenizer(sample)).float() if encoder.text_cut else None
        extras[name] = (len(sample), full_s, cut_s, float(needed.mean()) if needed is not None else 77.0)
    extras["decode"] = decode_comparison(encoder, settings, uris[:64], reference[:64])
    return {"images": len(uris), "images_s": photos_s, "texts": len(texts), "texts_s": texts_s,
            "note": "full JPEG decode (open_clip's reference)"}, extras


def decode_comparison(encoder, settings, uris: list[str], reference: np.ndarray) -> dict:
    """Decode + preprocess per photo on one thread, full decode vs draft; the draft vectors' cosine to
    the full decode's."""
    import torch
    from PIL import Image

    def full(uri):
        return encoder.preprocess(Image.open(uri).convert("RGB"))

    def draft(uri):
        data = photos.read_bytes(uri, settings.fetch, settings.uri_rules)
        return encoder.preprocess(photos.decode(data, settings.max_image_pixels, encoder.image_side))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    _, full_s = timed(lambda: [full(uri) for uri in uris])
    drafted, draft_s = timed(lambda: [draft(uri) for uri in uris])
    torch.set_num_threads(threads)
    vectors = np.concatenate([encoder.encode_images(torch.stack(batch)) for batch in chunks(drafted, 32)])
    cosines = (vectors * reference).sum(axis=1)
    return {"photos": len(uris), "full_ms": 1000 * full_s / len(uris), "draft_ms": 1000 * draft_s / len(uris),
            "cos_min": float(cosines.min()), "cos_mean": float(cosines.mean())}


# (b) ---------------------------------------------------------------------------------------------

def spark_job(spark, cfg) -> dict:
    print("(b) Spark job ...", flush=True)
    summary, total_s = timed(lambda: pipeline.run(spark, cfg))
    print(summary.describe(), flush=True)
    return {"images": summary.stats.get("images", 0), "images_s": summary.seconds["images"],
            "texts": summary.stats.get("texts", 0), "texts_s": summary.seconds["texts"], "total_s": total_s,
            "note": f"{summary.stats.get('model_loads', 0)} model builds inside the timing"}


# (c) and (d) -------------------------------------------------------------------------------------

def encode_uris(encoder, settings, uris) -> np.ndarray:
    """The job's per-photo work (read, decode, preprocess) without its thread pool or error rows."""
    import torch

    side = encoder.image_side if settings.jpeg_draft else 0
    pixels = [
        encoder.preprocess(photos.decode(photos.read_bytes(u, settings.fetch, settings.uri_rules), settings.max_image_pixels, side))
        for u in uris
    ]
    return encoder.encode_images(torch.stack(pixels))


def worker_encoder(settings):
    import torch

    torch.set_num_threads(settings.torch_threads)
    return encoders.build_encoder(settings.model, encoders.resolve_device(settings.model.device))


def naive_udf(spark, cfg, settings, uris, texts) -> dict:
    from pyspark.sql.functions import pandas_udf

    @pandas_udf("array<float>")
    def embed_photos(batch: pd.Series) -> pd.Series:
        return pd.Series(list(encode_uris(worker_encoder(settings), settings, batch.tolist())))

    @pandas_udf("array<float>")
    def embed_texts(batch: pd.Series) -> pd.Series:
        return pd.Series(list(worker_encoder(settings).encode_texts(batch.tolist())))

    print("(c) naive pandas UDF ...", flush=True)
    # One model batch per Arrow batch, so the model is built once per model batch.
    images_s = run_udf(spark, cfg, embed_photos, "uri", uris, settings.image_batch_size)
    texts_s = run_udf(spark, cfg, embed_texts, "text", texts, settings.text_batch_size)
    return {"images": len(uris), "images_s": images_s, "texts": len(texts), "texts_s": texts_s}


def predict_batch(spark, cfg, settings, uris, texts) -> dict:
    from pyspark.ml.functions import predict_batch_udf
    from pyspark.sql.types import ArrayType, FloatType

    builds = spark.sparkContext.accumulator(0)

    def make_photo_fn():
        encoder = worker_encoder(settings)
        builds.add(1)
        return lambda batch: encode_uris(encoder, settings, batch.tolist())

    def make_text_fn():
        encoder = worker_encoder(settings)
        builds.add(1)
        return lambda batch: encoder.encode_texts(batch.tolist())

    vector = ArrayType(FloatType())
    embed_photos = predict_batch_udf(make_photo_fn, return_type=vector, batch_size=settings.image_batch_size)
    embed_texts = predict_batch_udf(make_text_fn, return_type=vector, batch_size=settings.text_batch_size)
    print("(d) predict_batch_udf ...", flush=True)
    # predict_batch_udf caches the model per worker: build it in each worker first (a model batch per
    # task, so the tasks overlap) and count the builds that still fall inside the timed runs.
    parallel = spark.sparkContext.defaultParallelism
    run_udf(spark, cfg, embed_photos, "uri", uris[: parallel * settings.image_batch_size], settings.image_batch_size)
    run_udf(spark, cfg, embed_texts, "text", texts[: parallel * settings.text_batch_size], settings.text_batch_size)
    warm = builds.value
    images_s = run_udf(spark, cfg, embed_photos, "uri", uris, cfg.encode.arrow_batch_size)
    texts_s = run_udf(spark, cfg, embed_texts, "text", texts, cfg.encode.arrow_batch_size)
    return {"images": len(uris), "images_s": images_s, "texts": len(texts), "texts_s": texts_s,
            "note": f"{warm} model builds before timing, {builds.value - warm} during"}


def run_udf(spark, cfg, udf, column: str, values: list[str], arrow_batch: int) -> float:
    """Seconds to run `udf` over `values`, in the job's partitioning, into a sink that writes nothing."""
    partitions = cfg.encode.partitions or spark.sparkContext.defaultParallelism
    df = spark.createDataFrame(pd.DataFrame({column: values})).repartition(partitions)
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(arrow_batch))
    _, seconds = timed(lambda: df.select(udf(column).alias("embedding")).write.format("noop").mode("overwrite").save())
    return seconds


# memory ------------------------------------------------------------------------------------------

class Sampler:
    """Calls `sample()` on entering a `with` block, every `interval_s` in a thread inside it, and on
    leaving it."""

    def __init__(self, interval_s: float):
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(interval_s,), daemon=True)

    def __enter__(self):
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        self.sample()

    def _loop(self, interval_s: float) -> None:
        while not self._done.wait(interval_s):
            self.sample()

    def sample(self) -> None:
        raise NotImplementedError


class MachineLoad(Sampler):
    """The mean 1-minute load average of the machine while inside the `with` block."""

    def __init__(self, interval_s: float = 5.0):
        super().__init__(interval_s)
        self._samples: list[float] = []

    @property
    def mean(self) -> float:
        return sum(self._samples) / len(self._samples)

    def sample(self) -> None:
        self._samples.append(os.getloadavg()[0])


class PeakRss(Sampler):
    """The peak resident set (VmHWM) of this process and every process under it: the Spark JVM, the
    pyspark daemon and the Python workers it forks (sampled, since workers may exit before the end)."""

    def __init__(self, interval_s: float = 0.25):
        super().__init__(interval_s)
        self.peaks: dict[int, tuple[str, int]] = {}  # pid -> (role, KiB)

    @property
    def by_role(self) -> dict[str, list[int]]:
        """Peak KiB per process, by role: driver, jvm, daemon, worker, other."""
        roles = defaultdict(list)
        for role, kib in self.peaks.values():
            roles[role].append(kib)
        return dict(roles)

    def sample(self) -> None:
        children = defaultdict(list)
        for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            children[int(stat.rsplit(")", 1)[1].split()[1])].append(pid)
        stack = [(os.getpid(), "driver")]
        while stack:
            pid, role = stack.pop()
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            hwm = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")), 0)
            self.peaks[pid] = (role, max(hwm, self.peaks.get(pid, (role, 0))[1]))
            for child in children.get(pid, []):
                stack.append((child, _role(role, child)))


def _role(parent_role: str, pid: int) -> str:
    if parent_role == "daemon":
        return "worker"  # forked by the daemon
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return "other"
    if "java" in cmdline.split("\0", 1)[0]:
        return "jvm"
    if "pyspark.daemon" in cmdline:
        return "daemon"
    return "worker" if "pyspark.worker" in cmdline else "other"


def memory_run(args, n_listings: int) -> dict:
    """In a fresh process: the job over `n_listings` listings; peak RSS by process."""
    work = Path(args.work)
    catalogue = ensure_catalogue(work / f"memory-{n_listings}", n_listings, MEMORY_PHOTO_FILES)
    model = [] if args.memory_model == "same" else [
        "model.name=depop-tiny-clip", f"model.config_path={TINY_MODEL}", "model.seed=0"]
    cfg = bench_config(args, catalogue, work / f"memory-{n_listings}-tables", [*args.overrides, *model])
    spark = get_spark(cfg)
    spark.sparkContext.setLogLevel("ERROR")
    with PeakRss() as peaks, MachineLoad() as load:
        summary, seconds = timed(lambda: pipeline.run(spark, cfg))
    spark.stop()
    return {"listings": n_listings, "photos": catalogue.n_photos, "model": cfg.model.name, "seconds": seconds,
            "texts": summary.stats.get("texts", 0), "images": summary.stats.get("images", 0),
            "peaks_kib": peaks.by_role, "load": load.mean}


def memory_subprocess(args, n_listings: int) -> dict:
    print(f"memory: {n_listings} listings in a fresh process ...", flush=True)
    command = [sys.executable, __file__, "--memory-run", str(n_listings), "--work", args.work,
               "--memory-model", args.memory_model, *[f"--set={o}" for o in args.overrides]]
    log = Path(args.work) / f"memory-{n_listings}.log"
    with open(log, "w") as err:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=err, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"memory run for {n_listings} listings failed (exit {done.returncode}); see {log}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# report ------------------------------------------------------------------------------------------

def report(rows: dict, extras: dict, b_peaks: dict, cfg) -> None:
    names = {"a": "(a) bare open_clip loop", "b": "(b) Spark job, end to end", "c": "(c) naive pandas UDF",
             "d": "(d) predict_batch_udf"}
    print(f"\n{'':28}{'photos':>8}{'photos/s':>10}{'texts':>8}{'texts/s':>10}{'load':>6}")
    for key, row in rows.items():
        print(f"{names[key]:28}{row['images']:>8}{rate(row, 'images'):>10.2f}{row['texts']:>8}{rate(row, 'texts'):>10.2f}"
              f"{row['load']:>6.1f}  {row.get('note', '')}")
    print(f"(load: the machine's mean 1-minute load average during the measurement, on {os.cpu_count()} CPUs; "
          "other work on the machine slows each row by a different amount)")
    print(f"(b) whole run {rows['b']['total_s']:.1f}s; (a) model build {extras['model_build_s']:.1f}s "
          f"({extras['threads']} threads); texts run bucketed in (a) to (d)")
    for kind in ("images", "texts"):
        b = rate(rows["b"], kind)
        targets = {"a": 0.9, "c": 5.0, "d": 1.0} if kind == "images" else {}
        print(f"ratios, {kind}/s: " + ", ".join(
            f"b/{k} {b / rate(rows[k], kind):.2f}" + (f" (target >= {targets[k]}: {'met' if b / rate(rows[k], kind) >= targets[k] else 'MISSED'})" if k in targets else "")
            for k in ("a", "c", "d")))
    stage = rate(rows["b"], "images") / extras["model_alone"]
    print(f"photo stage: (b) {rate(rows['b'], 'images'):.2f} photos/s against {cfg.model.name} alone on the same "
          f"photos, decoded and preprocessed beforehand (m) {extras['model_alone']:.2f}: b/m {stage:.2f} "
          f"(target >= 0.9: {'met' if stage >= 0.9 else 'MISSED'})")
    for name in ("titles", "listing texts"):
        n, full_s, cut_s, tokens = extras[name]
        target = " (target >= 2: " + ("met)" if full_s / cut_s >= 2 else "MISSED)") if name == "titles" else ""
        print(f"text bucketing, {n} {name} (mean {tokens:.1f} positions needed): full 77-token pass "
              f"{n / full_s:.1f}/s, bucketed {n / cut_s:.1f}/s: x{full_s / cut_s:.2f}{target}")
    d = extras["decode"]
    print(f"decode + preprocess per photo, one thread, {d['photos']} photos: full {d['full_ms']:.1f} ms, JPEG draft "
          f"{d['draft_ms']:.1f} ms; draft vectors vs full decode: cosine min {d['cos_min']:.6f}, mean {d['cos_mean']:.6f}")
    # The driver's own peak includes the bare loop's model, so only the JVM and the workers are shown.
    print(f"peak RSS during (b), {cfg.model.name}: " + peak_line(b_peaks, driver=False), flush=True)


def report_memory(runs: list[dict], args) -> None:
    if not runs:
        return
    print(f"\nmemory: peak RSS (VmHWM), each size in a fresh driver/JVM, model {runs[0]['model']}"
          + (" (the tiny test architecture: the pipeline's memory, not the model's)" if args.memory_model == "tiny" else ""))
    for run in runs:
        print(f"  {run['listings']:>6} listings, {run['photos']} photos, {run['seconds']:.0f}s (load {run.get('load', 0):.1f}): "
              + peak_line(run["peaks_kib"]))
    if len(runs) >= 2:
        first, last = (max(r["peaks_kib"].get("worker", [0])) for r in (runs[0], runs[-1]))
        ratio = last / first
        print(f"  peak per Python worker, {runs[-1]['listings']} vs {runs[0]['listings']} listings: x{ratio:.3f} "
              f"(target <= 1.2: {'met' if ratio <= 1.2 else 'MISSED'})")


def peak_line(peaks: dict[str, list[int]], driver: bool = True) -> str:
    mib = {role: [kib / 1024 for kib in values] for role, values in peaks.items()}
    workers = sorted(mib.get("worker", []), reverse=True)
    return ((f"driver (python) {max(mib.get('driver', [0])):.0f} MiB, " if driver else "")
            + f"JVM {max(mib.get('jvm', [0])):.0f} MiB, "
            f"Python workers max {max(workers, default=0):.0f} MiB ({len(workers)} workers: "
            + ", ".join(f"{w:.0f}" for w in workers) + ")")


def rate(row: dict, kind: str) -> float:
    return row[kind] / row[f"{kind}_s"] if row[f"{kind}_s"] else 0.0


def chunks(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def timed(fn):
    started = time.monotonic()
    result = fn()
    return result, time.monotonic() - started


if __name__ == "__main__":
    main()
