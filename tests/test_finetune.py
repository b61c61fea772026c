"""Fine-tuning: the tiny model trains on a generated catalogue's pairs, validates on held-out listings,
resumes after a stop, and its registered challenger embeds in the job exactly as training encodes."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest

from depop_embed import encoders, finetune, pipeline
from depop_embed.config import ModelConfig
from depop_embed.sample_catalogue import write_catalogue
from depop_embed.tables import IMAGE_TABLE, TEXT_TABLE

from conftest import TINY_MODEL, make_config, read_delta

TRAINING = ("finetune.epochs=2", "finetune.batch_size=16", "finetune.warmup_steps=2", "finetune.learning_rate=0.002",
            "finetune.val_percent=25", "finetune.registered_model=depop-tiny-finetuned")


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    return write_catalogue(tmp_path_factory.mktemp("ft_catalogue"), n_listings=48, seed=5, photo_size=(96, 120))


def training_config(tmp: Path, catalogue, *extra: str):
    return make_config(tmp, f"finetune.run_dir={tmp / 'runs'}", *TRAINING, *extra,
                       listings=catalogue.listings_path, images=catalogue.images_path)


@pytest.fixture(scope="module")
def trained(spark, catalogue, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ft")
    cfg = training_config(tmp, catalogue)
    return cfg, finetune.finetune(spark, cfg, "whole")


def step_losses(run_id: str) -> list[float]:
    history = mlflow.MlflowClient().get_metric_history(run_id, "train/loss")
    return [m.value for m in sorted(history, key=lambda m: m.step)]


def test_the_loss_falls_and_every_epoch_is_validated(trained):
    cfg, result = trained
    losses = step_losses(result.run_id)
    assert len(losses) == result.steps > 4
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    assert len(result.history) == cfg.finetune.epochs
    for epoch in result.history:
        assert {"recall_at_1", "recall_at_5", "recall_at_10", "mrr"} <= set(epoch)
        assert 0 < epoch["recall_at_1"] <= epoch["recall_at_5"] <= epoch["recall_at_10"] <= 1
    run = mlflow.get_run(result.run_id)
    assert run.data.params["source.listings"].startswith("json:")
    assert "val/mrr" in run.data.metrics and "train/temperature" in run.data.metrics


def test_train_and_validation_are_disjoint_by_listing(spark, trained, catalogue):
    cfg, result = trained
    pairs = Path(cfg.finetune.run_dir) / "whole" / "pairs"
    train = set(pq.read_table(pairs / "train", columns=["listing_id"])["listing_id"].to_pylist())
    val = set(pq.read_table(pairs / "val", columns=["listing_id"])["listing_id"].to_pylist())
    assert train and val and not train & val
    assert result.train_pairs + result.val_pairs <= catalogue.n_photos
    # The split is the hash rule, whatever else a run does: the same listings held out at any size.
    every = spark.createDataFrame([(i,) for i in sorted(train | val)], "listing_id string")
    rule = {r.listing_id for r in every.where(finetune.is_held_out(every.listing_id, cfg.finetune.val_percent)).collect()}
    assert val == rule


def test_a_stopped_run_resumes_to_the_same_steps_and_loss(spark, catalogue, trained, tmp_path):
    _, whole = trained
    per_epoch = whole.steps // len(whole.history)
    assert per_epoch >= 3
    stop = per_epoch + 2  # in the middle of epoch 2, after epoch 1's checkpoint
    cfg = training_config(tmp_path, catalogue, f"faults.stop_finetune_after_step={stop}", "finetune.registered_model=depop-tiny-resumed")
    with pytest.raises(finetune.StopRequested):
        finetune.finetune(spark, cfg, "broken")
    assert len(step_losses(mlflow.search_runs(experiment_names=["depop-embed"], filter_string="attributes.run_name = 'finetune broken'", output_format="list")[0].info.run_id)) == stop
    resumed = finetune.finetune(spark, replace(cfg, faults=replace(cfg.faults, stop_finetune_after_step=0)), "broken")
    assert resumed.steps == whole.steps
    assert resumed.history[-1]["train_loss"] == pytest.approx(whole.history[-1]["train_loss"], rel=1e-3)
    assert resumed.best["mrr"] == pytest.approx(whole.best["mrr"], abs=1e-3)


def test_the_challenger_embeds_in_the_job_as_training_encodes(spark, engine, trained, catalogue, tmp_path):
    cfg, result = trained
    name = cfg.finetune.registered_model
    assert str(mlflow.MlflowClient().get_model_version_by_alias(name, "challenger").version) == result.registered.rsplit("/", 1)[1]
    job = make_config(tmp_path, "model.seed=null", f"model.registered=models:/{name}@challenger",
                      listings=catalogue.listings_path, images=catalogue.images_path, engine=engine)
    summary = pipeline.run(spark, job)
    assert summary.model_id == f"registered/{name}/{result.registered.rsplit('/', 1)[1]}"

    # The training code's own encoder: the best checkpoint built as training builds it.
    weights = Path(cfg.finetune.run_dir) / "whole" / "checkpoints" / finetune.BEST_WEIGHTS
    trained_encoder = encoders.build_encoder(ModelConfig(name="depop-tiny-clip", config_path=TINY_MODEL, checkpoint=str(weights)), "cpu")
    images = read_delta(f"{job.output.location}/{IMAGE_TABLE.name}").to_pandas()
    images = images[images["status"] == "ok"]
    pixels = [trained_encoder.load_photo(open(uri, "rb").read(), job.encode.max_image_pixels) for uri in images["image_uri"]]
    ours = trained_encoder.encode_images(trained_encoder.photo_input(pixels))
    stored = np.stack(images["embedding"].to_numpy())
    assert (np.sum(ours * stored, axis=1) >= 0.9999).all()
    texts = read_delta(f"{job.output.location}/{TEXT_TABLE.name}").to_pandas()
    ours = trained_encoder.encode_texts(texts["text"].tolist())
    assert (np.sum(ours * np.stack(texts["embedding"].to_numpy()), axis=1) >= 0.9999).all()
