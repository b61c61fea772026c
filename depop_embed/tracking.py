"""Every run of the job is an MLflow run: the resolved config, the model and the sources as params; row
counts, error rates, throughput, stage times, vector norms and drift as metrics; the config and a
sample of error rows as artifacts. A failed run (a breached gate or any error) ends FAILED with the
reason in the `depop_embed.failure` tag.

Where runs go is `config.tracking`: by default a SQLite store and an artifact folder inside the
project's run folder (`.depop_embed/`), on Databricks the workspace and the Unity Catalog registry.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import yaml

from depop_embed import __version__
from depop_embed.config import Config, TrackingConfig, as_dict

log = logging.getLogger(__name__)

FAILURE_TAG = "depop_embed.failure"
_MAX_PARAM = 6000  # MLflow's limits on a param's and a tag's value
_MAX_TAG = 8000


def configure(tracking: TrackingConfig) -> None:
    """Point MLflow at the configured tracking store and model registry."""
    import mlflow

    uri = tracking.tracking_uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(tracking.registry_uri or uri)
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        db.parent.mkdir(parents=True, exist_ok=True)
        # MLflow creates a new SQLite store's tables unguarded, and two first runs at once collide
        # ("table alembic_version already exists"): open the store under a lock.
        with open(db.with_name(db.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            mlflow.MlflowClient().search_experiments(max_results=1)


def experiment_id(tracking: TrackingConfig) -> str:
    """The configured experiment's id, creating it (with the configured artifact location) if new."""
    import mlflow
    from mlflow.exceptions import MlflowException

    configure(tracking)
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(tracking.experiment)
    if experiment is not None:
        return experiment.experiment_id
    location = tracking.artifact_location
    if location and "://" not in location:
        location = Path(location).resolve().as_uri()
    try:
        return client.create_experiment(tracking.experiment, artifact_location=location or None)
    except MlflowException:  # another run created it meanwhile
        return client.get_experiment_by_name(tracking.experiment).experiment_id


class RunTracker:
    """Logs to one MLflow run; `seconds` collects wall time per stage, logged when the run ends."""

    def __init__(self, client, run_id: str):
        self.client = client
        self.run_id = run_id
        self.seconds: dict[str, float] = {}

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        self.client.log_batch(self.run_id, params=[Param(k, _text(v, _MAX_PARAM)) for k, v in params.items()])

    def log_metrics(self, metrics: Mapping[str, float | None], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        values = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        self.client.log_batch(self.run_id, metrics=values)

    def log_staged(self, staged: Mapping[str, Any], sample_rows: int) -> None:
        """Rows, errors and error rate of each staged table (`pipeline.Staged`), and a sample of its error rows."""
        for name, table in staged.items():
            self.log_metrics({
                f"{name}/rows_selected": table.rows,
                f"{name}/rows_encoded": table.rows - table.errors,
                f"{name}/errors": table.errors,
                f"{name}/error_rate": table.errors / table.rows if table.rows else 0.0,
            })
            if table.errors and sample_rows and "error" in table.df.columns:
                rows = table.df.where("status = 'error'").drop(*[c for c in table.df.columns if c.endswith("embedding")])
                sample = [r.asDict() for r in rows.limit(sample_rows).collect()]
                self.client.log_text(self.run_id, json.dumps(sample, indent=1, default=str), f"errors/{name}.json")

    def log_quality(self, stats: Mapping[str, Mapping[str, Any]], drifts: Mapping[str, Any]) -> None:
        """`quality.vector_stats` per table and `quality.drift` per table."""
        metrics: dict[str, float | None] = {}
        for table, columns in stats.items():
            for column, s in columns.items():
                for field, value in dataclasses.asdict(s).items():
                    metrics[f"{table}/{column}_{field}"] = value
        for table, d in drifts.items():
            metrics[f"{table}/rows_unchanged"] = d.rows
            metrics[f"{table}/drift_mean_cosine"] = d.mean_cosine
        self.log_metrics(metrics)

    def log_summary(self, summary: Any) -> None:
        """What a finished run (`pipeline.RunSummary`) wrote and how fast it encoded."""
        metrics: dict[str, float | None] = {}
        for name, table in summary.tables.items():
            metrics[f"{name}/version"] = table.version
            metrics.update({f"{name}/{op}": n for op, n in table.changes.items()})
        for kind in ("images", "texts"):
            rows, secs = summary.stats.get(kind, 0), self.seconds.get(kind, 0.0)
            metrics[f"throughput/{kind}_per_s"] = rows / secs if secs else None
        for key in ("images", "texts", "image_batches", "text_batches", "model_loads", "images_refused"):
            metrics[f"encode/{key}"] = summary.stats.get(key, 0)
        self.log_metrics(metrics)


@contextmanager
def tracked_run(cfg: Config, run_name: str) -> Iterator[RunTracker]:
    """An MLflow run around one job run: FINISHED when the block completes, FAILED (with the reason) when it raises."""
    import mlflow

    experiment = experiment_id(cfg.tracking)
    client = mlflow.MlflowClient()
    run = client.create_run(experiment, run_name=run_name, tags={"depop_embed.version": __version__})
    tracker = RunTracker(client, run.info.run_id)
    settings = as_dict(cfg)
    tracker.log_params(_flatten(settings))
    client.log_text(run.info.run_id, yaml.safe_dump(settings, sort_keys=False), "config.yaml")
    started = time.monotonic()
    status = "FAILED"
    try:
        yield tracker
        status = "FINISHED"
    except BaseException as exc:
        client.set_tag(run.info.run_id, FAILURE_TAG, _text(f"{type(exc).__name__}: {exc}", _MAX_TAG))
        raise
    finally:
        tracker.seconds.setdefault("total", time.monotonic() - started)
        tracker.log_metrics({f"seconds/{stage}": secs for stage, secs in tracker.seconds.items()})
        client.set_terminated(run.info.run_id, status)
        log.info("MLflow run %s (%s) in experiment %s: %s", run.info.run_id, run_name, cfg.tracking.experiment, status)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"model": {"seed": 0}} -> {"model.seed": 0}; lists and empty mappings as JSON."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, (list, Mapping)) else value
    return flat


def _text(value: Any, limit: int) -> str:
    text = "" if value is None else str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
