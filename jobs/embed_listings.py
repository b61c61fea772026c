"""Embed listings: read listings + photos, encode with open_clip in Spark, MERGE into the Delta feature tables.

    spark-submit jobs/embed_listings.py --config conf/local.yaml [--set key=value ...]
    python jobs/embed_listings.py --config conf/local.yaml [--set key=value ...]
"""

from __future__ import annotations

import argparse
import logging
import sys

from depop_embed import config, pipeline
from depop_embed.session import get_spark


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config.add_arguments(parser)
    parser.add_argument(
        "--full-refresh", action="append_const", dest="overrides", const="incremental.full_refresh=true",
        help="re-embed every listing and photo for the model, not only what changed (= --set incremental.full_refresh=true)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    _, cfg = config.parse_job_arguments(build_parser(), argv)
    spark = get_spark(cfg)
    try:
        summary = pipeline.run(spark, cfg)
    except pipeline.RunFailed as exc:
        logging.getLogger("embed_listings").error("%s", exc)
        return 1
    print(summary.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
