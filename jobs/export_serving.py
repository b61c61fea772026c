"""Export a model's vectors for serving: a FAISS HNSW index file and, for the current model, the
`listing_search_vectors` table and the Databricks Vector Search Delta Sync index definition over it.

    python jobs/export_serving.py --config conf/local.yaml [--model-id ID] [--set serving.by=image ...]
"""

from __future__ import annotations

import argparse
import sys

from depop_embed import config, serving
from depop_embed.session import get_spark


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config.add_arguments(parser)
    parser.add_argument("--model-id", help="the model to export (default: the current model)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args, cfg = config.parse_job_arguments(build_parser(), argv)
    result = serving.export(get_spark(cfg), cfg, args.model_id)
    print(f"ANN index of {result.listings} listings of {result.model_id} -> {result.index_folder}")
    if result.search_vectors is not None:
        print(result.search_vectors.describe())
    if result.vector_search_file is not None:
        print(f"Vector Search index definition -> {result.vector_search_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
