"""Register an open_clip model in MLflow: package the weights the config's `model` section names, log
them as a pyfunc, register a new version of NAME and optionally point an alias at it.

    python jobs/register_model.py --config conf/local.yaml --name depop-clip --alias champion [--set key=value ...]

The embedding job then runs it with `--set model.seed=null --set model.registered=models:/depop-clip@champion`.
"""

from __future__ import annotations

import argparse
import sys

from depop_embed import config, registry


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config.add_arguments(parser)
    parser.add_argument("--name", required=True, help="registered model name (catalog.schema.model for Unity Catalog)")
    parser.add_argument("--alias", help="point this alias (e.g. champion) at the new version")
    return parser


def main(argv: list[str] | None = None) -> int:
    args, cfg = config.parse_job_arguments(build_parser(), argv)
    print(registry.register(cfg, args.name, args.alias))
    return 0


if __name__ == "__main__":
    sys.exit(main())
