"""Fine-tune the configured model on the listings' own photo/text pairs, validate on held-out listings
every epoch, and register the best epoch as a new version of `finetune.registered_model` with alias
`finetune.alias` (challenger).

    python jobs/finetune_model.py --config conf/local.yaml --run-name ft1 [--restart] [--set key=value ...]

A run name whose folder holds a checkpoint resumes from it; --restart starts it over.
"""

from __future__ import annotations

import argparse
import sys

from depop_embed import config, finetune
from depop_embed.session import get_spark


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config.add_arguments(parser)
    parser.add_argument("--run-name", required=True, help="the run's folder under finetune.run_dir (resumed if it holds a checkpoint)")
    parser.add_argument("--restart", action="store_true", help="discard the run folder's checkpoints and pairs first")
    return parser


def main(argv: list[str] | None = None) -> int:
    args, cfg = config.parse_job_arguments(build_parser(), argv)
    result = finetune.finetune(get_spark(cfg), cfg, args.run_name, resume=not args.restart)
    best = ", ".join(f"{k} {v:.3f}" for k, v in result.best.items())
    print(f"{result.steps} steps over {result.train_pairs} pairs ({result.val_pairs} held out) in {result.seconds:.0f}s; best: {best}")
    print(f"registered {result.registered} (@{cfg.finetune.alias}); MLflow run {result.run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
