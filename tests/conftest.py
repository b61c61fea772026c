"""Shared fixtures: one local SparkSession, a tiny open_clip model with seeded weights, and one
pipeline run over the bundled sample data that several tests read."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from depop_embed import config, pipeline
from depop_embed.session import get_spark

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = str(ROOT / "tests" / "assets" / "depop-tiny-clip.json")
SAMPLE = ROOT / "sample_data"
# One MLflow store for the whole test session: creating a SQLite store takes seconds.
MLFLOW = Path(tempfile.mkdtemp(prefix="depop-embed-mlflow-"))
TRACKING = [f"tracking.tracking_uri=sqlite:///{MLFLOW}/mlflow.db", f"tracking.artifact_location={MLFLOW}/artifacts"]


def job_overrides(tmp: Path, listings: Path | None = None, images: Path | None = None) -> list[str]:
    """The --set overrides that point conf/local.yaml at a tmp output folder, the tiny model and the test MLflow store."""
    return [
        f"listings.path={listings or SAMPLE / 'listings.jsonl'}",
        f"images.path={images or SAMPLE / 'listing_images.jsonl'}",
        f"output.location={tmp / 'tables'}",
        "model.name=depop-tiny-clip",
        f"model.config_path={TINY_MODEL}",
        "model.seed=0",
        "spark.master=local[2]",
        *TRACKING,
    ]


def make_config(tmp: Path, *overrides: str, listings: Path | None = None, images: Path | None = None) -> config.Config:
    """conf/local.yaml with `job_overrides`; extra --set style overrides."""
    return config.load(ROOT / "conf" / "local.yaml", [*job_overrides(tmp, listings, images), *overrides])


@pytest.fixture(scope="session", autouse=True)
def mlflow_store():
    yield MLFLOW
    shutil.rmtree(MLFLOW, ignore_errors=True)


@pytest.fixture(scope="session")
def spark(tmp_path_factory):
    cfg = make_config(tmp_path_factory.mktemp("session"), "spark.conf.spark.sql.shuffle.partitions=4")
    session = get_spark(cfg)
    yield session
    session.stop()


@pytest.fixture(scope="session")
def sample_run(spark, tmp_path_factory):
    """The sample catalogue embedded once with the tiny model; small batches so each worker runs many."""
    tmp = tmp_path_factory.mktemp("sample_run")
    # model.precision=fp32 (the CPU's precision anyway) makes a model key no other test uses: Python
    # workers and their model cache outlive a test, and this run must build the model itself.
    cfg = make_config(tmp, "encode.image_batch_size=8", "encode.text_batch_size=16", "model.precision=fp32")
    summary = pipeline.run(spark, cfg)
    yield cfg, summary
    shutil.rmtree(tmp, ignore_errors=True)


def open_clip_model(seed: int):
    """open_clip itself, built independently of depop_embed: (model, preprocess, tokenizer)."""
    import open_clip
    import torch

    open_clip.add_model_config(TINY_MODEL)
    torch.manual_seed(seed)
    model, _, preprocess = open_clip.create_model_and_transforms("depop-tiny-clip")
    return model.eval(), preprocess, open_clip.get_tokenizer("depop-tiny-clip")


@pytest.fixture(scope="session")
def reference_model():
    """The tiny model with the sample run's seed (0), built by open_clip itself."""
    return open_clip_model(0)


@pytest.fixture(scope="session")
def photo_server():
    """A local HTTP server for remote-photo cases (see tests/photo_server.py)."""
    from photo_server import PhotoServer

    server = PhotoServer()
    yield server
    server.close()
