"""Recompute `listing_neighbours`: the top-k nearest active listings of every active listing, in Spark.

    python jobs/build_neighbours.py --config conf/local.yaml [--model-id ID] [--by image|text|multimodal] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import sys

from depop_embed import config, neighbours
from depop_embed.config import EMBEDDINGS
from depop_embed.session import get_spark


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config.add_arguments(parser)
    parser.add_argument("--model-id", help="the model whose vectors to use (default: the current model)")
    parser.add_argument("--by", choices=EMBEDDINGS, help="which vector (default: neighbours.by)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args, cfg = config.parse_job_arguments(build_parser(), argv)
    result = neighbours.build(get_spark(cfg), cfg, args.model_id, args.by)
    print(result.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
