"""MLflow: the tiny model registered in the session's temporary store, the job run from the registry by
version and by alias, the pyfunc against the job's vectors, the tracked run, and a breached gate."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace

import mlflow
import numpy as np
import open_clip
import pandas as pd
import pytest
import torch
from deltalake import DeltaTable
from PIL import Image

from depop_embed import config, pipeline
from depop_embed.sample_catalogue import write_catalogue
from depop_embed.tables import IMAGE_TABLE, LISTING_TABLE, TABLES, TEXT_TABLE
from depop_embed.tracking import FAILURE_TAG

from conftest import ROOT, TINY_MODEL, job_overrides, make_config, read_delta

LOCAL = str(ROOT / "conf" / "local.yaml")


def job_main(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def sets(overrides: list[str]) -> list[str]:
    return [arg for override in overrides for arg in ("--set", override)]


def model_name(cfg: config.Config) -> str:
    """The registered model of the engine's run: one per engine, so each numbers its versions from 1."""
    return f"depop-tiny-{cfg.output.engine}"


def register_tiny(tmp_path, seed: int, name: str) -> None:
    argv = ["--config", LOCAL, *sets(job_overrides(tmp_path)), "--set", f"model.seed={seed}", "--name", name, "--alias", "champion"]
    assert job_main("register_model")(argv) == 0


def with_model(cfg: config.Config, registered: str, full_refresh: bool = False) -> config.Config:
    return replace(
        cfg, model=replace(cfg.model, registered=registered), incremental=replace(cfg.incremental, full_refresh=full_refresh)
    )


def table(cfg, spec) -> pd.DataFrame:
    return read_delta(f"{cfg.output.location}/{spec.name}").to_pandas()


def versions(cfg) -> dict[str, int]:
    return {spec.name: DeltaTable(f"{cfg.output.location}/{spec.name}").version() for spec in TABLES}


def mlflow_run(run_name: str) -> mlflow.entities.Run:
    (run,) = mlflow.search_runs(
        experiment_names=["depop-embed"], filter_string=f"attributes.run_name = '{run_name}'", output_format="list"
    )
    return run


def cosine(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    return write_catalogue(tmp_path_factory.mktemp("catalogue"), n_listings=8, seed=21)


@pytest.fixture(scope="module")
def version_run(spark, engine, catalogue, tmp_path_factory):
    """The tiny model with seed 0 registered through its job (version 1, alias `champion`), then the
    embedding job run with models:/NAME/1 over the catalogue, on each engine."""
    out = tmp_path_factory.mktemp(f"registered_run_{engine}")
    name = f"depop-tiny-{engine}"
    register_tiny(out, 0, name)
    cfg = make_config(
        out, "model.seed=null", f"model.registered=models:/{name}/1",
        listings=catalogue.listings_path, images=catalogue.images_path, engine=engine,
    )
    assert model_name(cfg) == name
    return cfg, pipeline.run(spark, cfg)


def test_the_job_runs_a_registered_version_and_names_it_in_model_id(version_run, catalogue):
    cfg, summary = version_run
    name = model_name(cfg)
    assert summary.model_id == f"registered/{name}/1"
    images, texts, fused = (table(cfg, spec) for spec in (IMAGE_TABLE, TEXT_TABLE, LISTING_TABLE))
    assert len(images) == catalogue.n_photos and len(texts) == len(fused) == catalogue.n_listings
    for df in (images, texts, fused):
        assert set(df["model_id"]) == {f"registered/{name}/1"}
    assert (images["status"] == "ok").all() and (texts["status"] == "ok").all()
    # The registered weights are the seeded ones: the vectors are open_clip's own for seed 0.
    open_clip.add_model_config(TINY_MODEL)
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("depop-tiny-clip")
    tokenizer = open_clip.get_tokenizer("depop-tiny-clip")
    with torch.inference_mode():
        for _, row in images.head(3).iterrows():
            expected = model.eval().encode_image(preprocess(Image.open(row["image_uri"]).convert("RGB")).unsqueeze(0))[0]
            assert cosine(row["embedding"], expected) >= 0.9999
        for _, row in texts.head(3).iterrows():
            assert cosine(row["embedding"], model.encode_text(tokenizer([row["text"]]))[0]) >= 0.9999


def test_the_run_is_tracked_with_params_metrics_and_artifacts(version_run, catalogue, tmp_path):
    cfg, summary = version_run
    name = model_name(cfg)
    run = mlflow_run(summary.run_id)
    assert run.info.status == "FINISHED"
    params, metrics = run.data.params, run.data.metrics
    assert params["model_id"] == f"registered/{name}/1" and params["model.registered"] == f"models:/{name}/1"
    assert params["thresholds.max_error_rate"] == "0.05" and params["text.template"].startswith('["{title}"')
    assert params["source.listings"].startswith(f"json:{catalogue.listings_path} read at ")
    assert metrics["read/listings"] == metrics["selected/texts"] == catalogue.n_listings
    assert metrics["read/images"] == metrics["selected/images"] == catalogue.n_photos
    rows = {IMAGE_TABLE.name: catalogue.n_photos, TEXT_TABLE.name: catalogue.n_listings, LISTING_TABLE.name: catalogue.n_listings}
    for name, n in rows.items():
        assert metrics[f"{name}/rows_selected"] == metrics[f"{name}/rows_encoded"] == n
        assert metrics[f"{name}/errors"] == metrics[f"{name}/error_rate"] == 0
        assert metrics[f"{name}/version"] == summary.tables[name].version
    for name, column in [(IMAGE_TABLE.name, "embedding"), (TEXT_TABLE.name, "embedding"), (LISTING_TABLE.name, "multimodal_embedding")]:
        assert metrics[f"{name}/{column}_vectors"] == rows[name] and metrics[f"{name}/{column}_non_finite"] == 0
        for stat in ("norm_min", "norm_mean", "norm_max"):
            assert metrics[f"{name}/{column}_{stat}"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["throughput/images_per_s"] == pytest.approx(catalogue.n_photos / summary.seconds["images"])
    assert metrics["throughput/texts_per_s"] == pytest.approx(catalogue.n_listings / summary.seconds["texts"])
    assert metrics["encode/images"] == catalogue.n_photos and metrics["encode/model_loads"] >= 1
    for stage in ("texts", "images", "listings", "commit", "total"):
        assert metrics[f"seconds/{stage}"] == pytest.approx(summary.seconds[stage])
    # A first run has nothing stored to compare with: no drift figure.
    assert metrics[f"{IMAGE_TABLE.name}/rows_unchanged"] == 0 and f"{IMAGE_TABLE.name}/drift_mean_cosine" not in metrics
    resolved = mlflow.artifacts.download_artifacts(artifact_uri=f"{run.info.artifact_uri}/config.yaml", dst_path=str(tmp_path))
    assert config.load(resolved) == cfg


def test_an_alias_is_pinned_to_its_version_and_unchanged_rows_show_no_drift(spark, version_run, tmp_path):
    cfg, first = version_run
    name = model_name(cfg)
    # A full refresh re-encodes every unchanged photo and text with the version the alias names.
    by_alias = pipeline.run(spark, with_model(cfg, f"models:/{name}@champion", full_refresh=True))
    assert by_alias.model_id == f"registered/{name}/1"
    run = mlflow_run(by_alias.run_id)
    assert run.data.params["model.registered"] == f"models:/{name}@champion"
    assert run.data.params["model_id"] == f"registered/{name}/1"
    # Same content, same weights: the same vectors.
    for table_name in (IMAGE_TABLE.name, TEXT_TABLE.name):
        assert run.data.metrics[f"{table_name}/rows_unchanged"] == first.tables[table_name].rows
        assert run.data.metrics[f"{table_name}/drift_mean_cosine"] == pytest.approx(1.0, abs=1e-6)

    # The alias moves to a new version: the next run writes that version's rows beside the first's.
    register_tiny(tmp_path, 1, name)
    moved = pipeline.run(spark, with_model(cfg, f"models:/{name}@champion"))
    assert moved.model_id == f"registered/{name}/2"
    fused = table(cfg, LISTING_TABLE)
    n = first.tables[LISTING_TABLE.name].rows
    assert fused.groupby("model_id").size().to_dict() == {f"registered/{name}/1": n, f"registered/{name}/2": n}
    one, two = (
        np.stack(fused[fused["model_id"] == f"registered/{name}/{v}"].sort_values("listing_id")["text_embedding"]) for v in (1, 2)
    )
    assert not np.allclose(one, two)  # other weights, other vectors
    assert mlflow_run(moved.run_id).data.metrics[f"{TEXT_TABLE.name}/rows_unchanged"] == 0  # nothing stored for version 2


def test_the_pyfunc_vectors_equal_the_jobs(version_run):
    cfg, _ = version_run
    name = model_name(cfg)
    model = mlflow.pyfunc.load_model(f"models:/{name}/1")
    assert model.metadata.get_input_schema().input_names() == ["image", "text"]
    images = table(cfg, IMAGE_TABLE).query(f"model_id == 'registered/{name}/1'").reset_index(drop=True)
    texts = table(cfg, TEXT_TABLE).query(f"model_id == 'registered/{name}/1'").reset_index(drop=True)
    photo_bytes = [open(uri, "rb").read() for uri in images["image_uri"]]

    out = model.predict(pd.DataFrame({"image": photo_bytes}))
    assert out["error"].isna().all() and out["text_embedding"].isna().all()
    for stored, served in zip(images["embedding"], out["image_embedding"]):
        assert cosine(stored, served) >= 0.9999
    out = model.predict(pd.DataFrame({"text": texts["text"]}))
    for stored, served in zip(texts["embedding"], out["text_embedding"]):
        assert cosine(stored, served) >= 0.9999

    # Both columns at once, a photo that does not decode, and a row with neither.
    out = model.predict(pd.DataFrame({"image": [photo_bytes[0], b"not a photo", None], "text": [texts["text"][0], "red dress", None]}))
    assert cosine(out["image_embedding"][0], images["embedding"][0]) >= 0.9999
    assert cosine(out["text_embedding"][0], texts["embedding"][0]) >= 0.9999
    assert out["error"][0] is None and out["error"][1].startswith("unsupported_format:") and out["image_embedding"][1] is None
    assert np.linalg.norm(out["text_embedding"][1]) == pytest.approx(1.0, abs=1e-5)
    assert out["image_embedding"][2] is None and out["text_embedding"][2] is None and out["error"][2] is None


def test_a_breached_gate_exits_non_zero_commits_nothing_and_fails_the_mlflow_run(version_run, catalogue, tmp_path):
    cfg, _ = version_run
    name = model_name(cfg)
    # The catalogue again, but the first photo's file is not an image: one error row among the photos.
    rows = [json.loads(line) for line in catalogue.images_path.read_text().splitlines()]
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    rows = [{**r, "uri": str(tmp_path / "broken.jpg" if i == 0 else catalogue.images_path.parent / r["uri"])} for i, r in enumerate(rows)]
    photos = tmp_path / "listing_images.jsonl"
    photos.write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = versions(cfg)
    overrides = job_overrides(tmp_path, catalogue.listings_path, photos, cfg.output.engine) + [
        f"output.location={cfg.output.location}", "model.seed=null", f"model.registered=models:/{name}/1",
        "thresholds.max_error_rate=0.0",
    ]
    assert job_main("embed_listings")(["--config", LOCAL, *sets(overrides)]) == 1
    assert versions(cfg) == before

    (run,) = mlflow.search_runs(experiment_names=["depop-embed"], order_by=["attributes.start_time DESC"], max_results=1, output_format="list")
    assert run.info.status == "FAILED"
    reason = run.data.tags[FAILURE_TAG]
    assert reason.startswith("RunFailed: quality gate failed, nothing committed")
    assert "listing_image_embeddings: error rate" in reason and "thresholds.max_error_rate 0.0%" in reason
    assert run.data.metrics[f"{IMAGE_TABLE.name}/errors"] == 1 and f"{IMAGE_TABLE.name}/version" not in run.data.metrics
    sample = json.loads(mlflow.artifacts.load_text(f"{run.info.artifact_uri}/errors/{IMAGE_TABLE.name}.json"))
    assert [(r["image_id"], r["error"].split(":")[0]) for r in sample] == [(rows[0]["image_id"], "unsupported_format")]
