"""Evaluate a model's vectors before it becomes current: text -> listing recall@k, neighbour category and
brand agreement, against the baseline model; an HTML report; everything logged to MLflow.

    python jobs/evaluate_model.py --config conf/local.yaml [--model-id ID] [--baseline ID] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import sys

from depop_embed import config, evaluation
from depop_embed.session import get_spark


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config.add_arguments(parser)
    parser.add_argument("--model-id", help="the model to evaluate (default: the current model)")
    parser.add_argument(
        "--baseline", help="the model to compare with (default: the current model, or the one before it)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args, cfg = config.parse_job_arguments(build_parser(), argv)
    result = evaluation.evaluate(get_spark(cfg), cfg, args.model_id, args.baseline)
    for role, scores in (("candidate", result.candidate), ("baseline", result.baseline)):
        if scores is not None:
            ks = "/".join(str(k) for k in cfg.evaluation.ks)
            recall = "; ".join(f"{by} " + "/".join(f"{v:.3f}" for v in r.values()) for by, r in scores.recall.items())
            print(f"{role} {scores.model_id}: {scores.listings} listings; recall@{ks}: {recall}")
    print(f"report -> {result.report_path} (MLflow run {result.mlflow_run_id})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
