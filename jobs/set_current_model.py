"""Switch the model consumers read: one pointer row in the `current_model` table (and, in Unity Catalog,
the `<table>_current` views that follow it).

    python jobs/set_current_model.py --config conf/local.yaml --model-id ViT-B-32/laion2b_s34b_b79k
"""

from __future__ import annotations

import argparse
import getpass
import sys

from depop_embed import config, pipeline
from depop_embed.session import get_spark


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file under conf/ (names the tables)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--model-id", required=True, help="a model_id already written to the tables")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config.load(args.config, args.overrides)
    except config.ConfigError as exc:
        parser.error(str(exc))
    try:
        previous = pipeline.set_current_model(get_spark(cfg), cfg, args.model_id, f"set_current_model by {getpass.getuser()}")
    except pipeline.RunFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"current model: {previous} -> {args.model_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
