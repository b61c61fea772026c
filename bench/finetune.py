"""Does fine-tuning teach a model from seeded random weights the catalogue? (run by hand; prints figures)

    python bench/finetune.py --listings 400 [--epochs 6] [--batch-size 32]

Writes a generated catalogue (drawn garments: category silhouette and colour that the titles name),
fine-tunes the tiny test architecture on it through the job's own code (`finetune.finetune`: Spark
pairs, Parquet shards, ClipLoss), and measures on the held-out listings, before and after:
text -> listing recall@10 and the category agreement of each listing's 10 nearest photo neighbours.
Peak RSS is this Python process's (training runs in it); run two sizes to see it does not grow.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from depop_embed import config, encoders, finetune  # noqa: E402
from depop_embed.sample_catalogue import write_catalogue  # noqa: E402
from depop_embed.session import get_spark  # noqa: E402

TINY = ROOT / "tests" / "assets" / "depop-tiny-clip.json"


def agreement_at(vectors: np.ndarray, categories: list[str], k: int) -> float:
    scores = vectors @ vectors.T
    np.fill_diagonal(scores, -np.inf)
    nearest = np.argsort(-scores, axis=1)[:, :k]
    cats = np.asarray(categories, dtype=object)
    return float((cats[nearest] == cats[:, None]).mean())


def figures(encoder, cfg, val_dir: str, category: dict[str, str]) -> dict[str, float]:
    ids, listings, queries = finetune.held_out_vectors(encoder, val_dir, cfg.encode.max_image_pixels, cfg.encode.jpeg_draft)
    out = finetune.retrieval_scores(listings, queries, (1, 5, 10))
    out["category_agreement_at_10"] = agreement_at(listings, [category[i] for i in ids], 10)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listings", type=int, default=400)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=0.002)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    tmp = Path(tempfile.mkdtemp(prefix="bench-finetune-"))
    cat = write_catalogue(tmp / "catalogue", n_listings=args.listings, seed=11, photo_size=(160, 200), max_photo_files=None)
    overrides = [
        f"listings.path={cat.listings_path}", f"images.path={cat.images_path}", "model.name=depop-tiny-clip",
        f"model.config_path={TINY}", "model.seed=0", "spark.master=local[2]", f"output.location={tmp / 'tables'}",
        f"tracking.tracking_uri=sqlite:///{tmp}/mlflow.db", f"tracking.artifact_location={tmp}/artifacts",
        f"finetune.run_dir={tmp / 'runs'}", f"finetune.epochs={args.epochs}", f"finetune.batch_size={args.batch_size}",
        f"finetune.learning_rate={args.learning_rate}", "finetune.warmup_steps=10", "finetune.val_percent=20",
        "finetune.registered_model=bench-finetuned",
    ]
    cfg = config.load(ROOT / "conf" / "local.yaml", overrides)
    spark = get_spark(cfg)
    category = {row["listing_id"]: row["category"] for row in map(json.loads, cat.listings_path.read_text().splitlines())}
    started = time.monotonic()
    result = finetune.finetune(spark, cfg, "bench")
    seconds = time.monotonic() - started
    val_dir = str(tmp / "runs" / "bench" / "pairs" / "val")
    untrained = figures(encoders.build_encoder(cfg.model, "cpu"), cfg, val_dir, category)
    weights = tmp / "runs" / "bench" / "checkpoints" / finetune.BEST_WEIGHTS
    tuned = figures(encoders.build_encoder(finetune._checkpoint_model(cfg.model, None, weights), "cpu"), cfg, val_dir, category)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"catalogue: {args.listings} listings, {cat.n_photos} photos; {result.train_pairs} training pairs, "
          f"{result.val_pairs} held-out pairs over {int(tuned['listings'])} held-out listings")
    print(f"training: {result.steps} steps ({args.epochs} epochs, batch {args.batch_size}) in {seconds:.0f}s incl. pair writing; "
          f"peak RSS of the training process {peak_mib:.0f} MiB")
    for what in ("recall_at_1", "recall_at_5", "recall_at_10", "mrr", "category_agreement_at_10"):
        ratio = tuned[what] / untrained[what] if untrained[what] else float("inf")
        print(f"  {what:26s} untrained {untrained[what]:.3f}  fine-tuned {tuned[what]:.3f}  ({ratio:.1f}x)")
    print(f"registered {result.registered}")
    spark.stop()


if __name__ == "__main__":
    main()
