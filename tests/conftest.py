"""Shared fixtures: one local SparkSession (with Delta's Spark connector), both Delta engines, a tiny
open_clip model with seeded weights, and one pipeline run per engine over the bundled sample data that
several tests read."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pytest
from deltalake import DeltaTable

from depop_embed import config, pipeline
from depop_embed.session import get_spark

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = str(ROOT / "tests" / "assets" / "depop-tiny-clip.json")
SAMPLE = ROOT / "sample_data"
# One MLflow store for the whole test session: creating a SQLite store takes seconds.
MLFLOW = Path(tempfile.mkdtemp(prefix="depop-embed-mlflow-"))
TRACKING = [f"tracking.tracking_uri=sqlite:///{MLFLOW}/mlflow.db", f"tracking.artifact_location={MLFLOW}/artifacts"]
# Every test that writes or reads the tables runs on both (the `engine` fixture).
ENGINES = ("delta-rs", "spark")


def job_overrides(tmp: Path, listings: Path | None = None, images: Path | None = None, engine: str | None = None) -> list[str]:
    """The --set overrides that point conf/local.yaml at a tmp output folder, the tiny model, the test
    MLflow store and (when given) a Delta engine."""
    return [
        f"listings.path={listings or SAMPLE / 'listings.jsonl'}",
        f"images.path={images or SAMPLE / 'listing_images.jsonl'}",
        f"output.location={tmp / 'tables'}",
        "model.name=depop-tiny-clip",
        f"model.config_path={TINY_MODEL}",
        "model.seed=0",
        "spark.master=local[2]",
        *TRACKING,
        *([f"output.engine={engine}"] if engine else []),
    ]


def make_config(
    tmp: Path, *overrides: str, listings: Path | None = None, images: Path | None = None, engine: str | None = None
) -> config.Config:
    """conf/local.yaml with `job_overrides`; extra --set style overrides."""
    return config.load(ROOT / "conf" / "local.yaml", [*job_overrides(tmp, listings, images, engine), *overrides])


def read_delta(path, version: int | None = None) -> pa.Table:
    """A Delta table's rows, read by delta-rs whichever engine wrote them (deletion vectors applied), with
    plain string/binary arrays where delta-rs's scan gives view arrays."""
    table = pa.table(DeltaTable(str(path), version=version).scan())
    plain = {pa.string_view(): pa.string(), pa.binary_view(): pa.binary()}
    return table.cast(pa.schema([f.with_type(plain.get(f.type, f.type)) for f in table.schema]))


@pytest.fixture(scope="session", autouse=True)
def mlflow_store():
    yield MLFLOW
    shutil.rmtree(MLFLOW, ignore_errors=True)


@pytest.fixture(scope="session")
def spark(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("session")
    # The warehouse holds the tables of catalog.schema locations (Spark's own catalog standing in for Unity Catalog).
    cfg = make_config(tmp, "spark.conf.spark.sql.shuffle.partitions=4", f"spark.conf.spark.sql.warehouse.dir={tmp / 'warehouse'}")
    session = get_spark(cfg)
    yield session
    session.stop()


@pytest.fixture(scope="session", params=ENGINES)
def engine(request) -> str:
    """The Delta engine a test writes and reads its tables with; test ids name it."""
    return request.param


@pytest.fixture(scope="session")
def sample_run(spark, engine, tmp_path_factory):
    """The sample catalogue embedded once per engine with the tiny model; small batches so each worker runs many."""
    tmp = tmp_path_factory.mktemp(f"sample_run_{engine}")
    # model.precision fp32/fp16 (both plain fp32 on the CPU) makes a model key no other test uses, one
    # per engine: Python workers and their model cache outlive a test, and this run must build the model.
    precision = {"delta-rs": "fp32", "spark": "fp16"}[engine]
    cfg = make_config(
        tmp, "encode.image_batch_size=8", "encode.text_batch_size=16", f"model.precision={precision}", engine=engine
    )
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
def built_wheel(tmp_path_factory) -> Path:
    """The project's wheel as the bundle's artifact builds it, from a copy (no build/ or egg-info left in the checkout)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source)
    for name in ("depop_embed", "conf"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", tmp / "dist", source], check=True)
    (wheel,) = (tmp / "dist").glob("depop_embed-*.whl")
    return wheel


@pytest.fixture(scope="session")
def photo_server():
    """A local HTTP server for remote-photo cases (see tests/photo_server.py)."""
    from photo_server import PhotoServer

    server = PhotoServer()
    yield server
    server.close()
