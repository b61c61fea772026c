"""Ask the feature tables: listings like a listing, or listings for a text query (exact search over the
current model's vectors, or --model-id's).

    python jobs/query_listings.py similar L000001 --config conf/local.yaml [-k 10] [--by image]
    python jobs/query_listings.py search "black nike hoodie" --config conf/local.yaml [-k 10]
"""

from __future__ import annotations

import argparse
import sys

from depop_embed import config
from depop_embed.config import EMBEDDINGS
from depop_embed.reader import EmbeddingReader


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    config.add_arguments(common)
    common.add_argument("--model-id", help="the model whose vectors to search (default: the current model)")
    common.add_argument("-k", type=int, default=10, help="how many listings (default 10)")
    common.add_argument("--by", choices=EMBEDDINGS, default="multimodal", help="which vector (default multimodal)")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("similar", parents=[common], help="listings like a listing").add_argument("listing_id")
    sub.add_parser("search", parents=[common], help="listings for a text query").add_argument("query")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg = config.from_arguments(parser, args)
    if args.k < 1:
        parser.error("-k: must be >= 1")
    spark = None
    if cfg.output.is_catalog:  # Unity Catalog tables are read through Spark; a folder needs none
        from depop_embed.session import get_spark

        spark = get_spark(cfg)
    reader = EmbeddingReader.from_config(cfg, spark)
    try:
        if args.command == "similar":
            found = reader.similar_listings(args.listing_id, args.k, args.by, args.model_id)
        else:
            found = reader.search(args.query, args.k, args.by, args.model_id)
    except (KeyError, LookupError) as exc:
        print(f"error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 1
    texts = reader.texts(args.model_id)
    for row in found.itertuples(index=False):
        print(f"{row.rank:>3}  {row.score:.4f}  {row.listing_id}  {texts.get(row.listing_id, '')[:80]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
