"""The job end to end on the bundled sample data: real local Spark, real Delta tables, both engines."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
from deltalake import DeltaTable
from PIL import Image

from depop_embed import pipeline, quality
from depop_embed.sample_catalogue import write_catalogue
from depop_embed.tables import IMAGE_TABLE, LISTING_TABLE, TABLES, TEXT_TABLE, commit_info

from conftest import SAMPLE, make_config, read_delta
from hostile_corpus import read_jsonl

DIM = 32  # embed_dim of the tiny test model




def table(cfg, spec) -> pd.DataFrame:
    return read_delta(f"{cfg.output.location}/{spec.name}").to_pandas()


def cosine(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_row_counts_match_the_sample(sample_run):
    cfg, summary = sample_run
    listings, photos = read_jsonl(SAMPLE / "listings.jsonl"), read_jsonl(SAMPLE / "listing_images.jsonl")
    images, texts, fused = table(cfg, IMAGE_TABLE), table(cfg, TEXT_TABLE), table(cfg, LISTING_TABLE)
    assert len(images) == len(photos) and len(texts) == len(listings) and len(fused) == len(listings)
    assert set(images["image_id"]) == {p["image_id"] for p in photos}
    assert set(texts["listing_id"]) == set(fused["listing_id"]) == {row["listing_id"] for row in listings}
    assert (images["status"] == "ok").all() and (texts["status"] == "ok").all()
    assert set(images["model_id"]) == set(texts["model_id"]) == set(fused["model_id"]) == {"depop-tiny-clip/seed-0"}
    assert summary.tables[IMAGE_TABLE.name].rows == len(photos)


def test_every_ok_vector_has_the_dimension_and_unit_norm(sample_run):
    cfg, _ = sample_run
    for spec, column in [(IMAGE_TABLE, "embedding"), (TEXT_TABLE, "embedding"), (LISTING_TABLE, "image_embedding"),
                         (LISTING_TABLE, "text_embedding"), (LISTING_TABLE, "multimodal_embedding")]:
        vectors = [v for v in table(cfg, spec)[column] if v is not None]
        assert vectors, f"{spec.name}.{column} has no vectors"
        matrix = np.stack(vectors)
        assert matrix.dtype == np.float32 and matrix.shape[1] == DIM
        assert np.isfinite(matrix).all()
        np.testing.assert_allclose(np.linalg.norm(matrix, axis=1), 1.0, atol=1e-4)


def test_photo_vectors_match_open_clip_itself(sample_run, reference_model):
    cfg, _ = sample_run
    model, preprocess, _ = reference_model
    images = table(cfg, IMAGE_TABLE).set_index("image_id")
    picked = {}
    for image_id, row in images.iterrows():
        with Image.open(row["image_uri"]) as im:
            picked.setdefault((im.format, im.mode), image_id)
    # Kinds open_clip's transform handles as they are: the stored vector is open_clip's own.
    for kind in [("JPEG", "RGB"), ("JPEG", "L"), ("PNG", "RGB")]:
        row = images.loc[picked[kind]]
        with torch.inference_mode():
            expected = model.encode_image(preprocess(Image.open(row["image_uri"])).unsqueeze(0))[0]
        assert cosine(row["embedding"], expected) >= 0.9999, kind
    # Palette images are expanded to RGB before resizing (PIL can only resize palette indices with
    # nearest-neighbour, which is what open_clip alone would do).
    row = images.loc[picked[("PNG", "P")]]
    with torch.inference_mode():
        expected = model.encode_image(preprocess(Image.open(row["image_uri"]).convert("RGB")).unsqueeze(0))[0]
    assert cosine(row["embedding"], expected) >= 0.9999


def test_transparent_photos_are_embedded_on_white(sample_run, reference_model):
    cfg, _ = sample_run
    model, preprocess, _ = reference_model
    images = table(cfg, IMAGE_TABLE)
    rgba = [row for _, row in images.iterrows() if Image.open(row["image_uri"]).mode == "RGBA"][:2]
    assert rgba
    for row in rgba:
        photo = Image.open(row["image_uri"]).convert("RGBA")
        on_white = Image.alpha_composite(Image.new("RGBA", photo.size, "white"), photo).convert("RGB")
        with torch.inference_mode():
            expected = model.encode_image(preprocess(on_white).unsqueeze(0))[0]
        assert cosine(row["embedding"], expected) >= 0.9999


def test_text_is_the_template_over_the_fields_and_vectors_match_open_clip(sample_run, reference_model):
    cfg, _ = sample_run
    model, _, tokenizer = reference_model
    texts = table(cfg, TEXT_TABLE).set_index("listing_id")
    listings = {row["listing_id"]: row for row in read_jsonl(SAMPLE / "listings.jsonl")}
    for listing_id in ["L000001", "L000004", "L000027", "L000150"]:
        src = listings[listing_id]
        parts = [src["title"], src["brand"], src["category"], f"size {src['size']}", src["condition"], src["colour"], src["description"]]
        expected_text = ". ".join(p for p in parts if p and p != "size None")
        row = texts.loc[listing_id]
        assert row["text"] == expected_text
        with torch.inference_mode():
            expected = model.encode_text(tokenizer([expected_text]))[0]
        assert cosine(row["embedding"], expected) >= 0.9999
        assert row["template_version"] == "v1" and len(row["text_hash"]) == 64


def test_listing_vectors_pool_photos_and_mix_with_text(sample_run):
    cfg, _ = sample_run
    images, texts = table(cfg, IMAGE_TABLE), table(cfg, TEXT_TABLE).set_index("listing_id")
    fused = table(cfg, LISTING_TABLE).set_index("listing_id")
    status = {row["listing_id"]: row["status"] for row in read_jsonl(SAMPLE / "listings.jsonl")}
    w = cfg.fusion.image_weight

    def unit(v):
        return v / np.linalg.norm(v)

    without_photos = 0
    for listing_id, row in fused.iterrows():
        photos = images[images["listing_id"] == listing_id]["embedding"]
        text = np.asarray(texts.loc[listing_id, "embedding"])
        np.testing.assert_allclose(row["text_embedding"], text, atol=1e-6)
        assert row["n_images"] == len(photos)
        assert row["is_active"] == (status[listing_id] not in ("sold", "deleted"))
        if len(photos) == 0:
            without_photos += 1
            assert row["image_embedding"] is None
            np.testing.assert_allclose(row["multimodal_embedding"], text, atol=1e-6)
            continue
        pooled = unit(np.mean(np.stack(photos), axis=0))
        np.testing.assert_allclose(row["image_embedding"], pooled, atol=1e-5)
        np.testing.assert_allclose(row["multimodal_embedding"], unit(w * pooled + (1 - w) * text), atol=1e-5)
    assert without_photos >= 5
    assert (~fused["is_active"]).sum() == sum(s == "sold" for s in status.values())


def test_the_model_is_built_once_per_worker_process(sample_run):
    _, summary = sample_run
    stats = summary.stats
    loads_by_worker = stats["model_loads_by_worker"]
    assert set(loads_by_worker.values()) == {1}, loads_by_worker
    assert stats["model_loads"] == len(loads_by_worker) <= 4  # local[2]: a couple of Python workers
    # batches of 8 photos and 16 texts: each worker ran many batches on its one model
    assert stats["image_batches"] >= 497 // 8 and stats["text_batches"] >= 200 // 16
    assert stats["image_batches"] + stats["text_batches"] > 10 * stats["model_loads"]
    assert stats["images"] == 497 and stats["texts"] == 200


def test_tables_are_delta_with_change_data_feed_comments_and_the_contract_schema(sample_run):
    cfg, _ = sample_run
    for spec in TABLES:
        dt = DeltaTable(f"{cfg.output.location}/{spec.name}")
        assert dt.metadata().configuration.get("delta.enableChangeDataFeed") == "true"
        assert dt.metadata().description == spec.comment
        fields = {f["name"]: f for f in json.loads(dt.schema().to_json())["fields"]}
        assert list(fields) == spec.column_names
        for column in spec.columns:
            assert fields[column.name]["metadata"].get("comment") == column.comment
            assert fields[column.name]["nullable"] == column.nullable
        arrow = pa.schema(dt.schema().to_arrow())
        for column in spec.columns:
            if column.type == "vector":
                assert pa.types.is_list(arrow.field(column.name).type) or pa.types.is_large_list(arrow.field(column.name).type)
        changes = pa.table(dt.load_cdf(starting_version=0))
        assert set(changes.column("_change_type").to_pylist()) <= {"insert", "update_preimage", "update_postimage"}
        commit = commit_info(dt.history()[0])
        assert commit["depop_embed.model_id"] == "depop-tiny-clip/seed-0" and "depop_embed.run_id" in commit


def test_bad_photos_become_error_rows_and_the_gate_stops_the_commit(spark, engine, tmp_path):
    catalogue = write_catalogue(tmp_path / "src", n_listings=12, seed=3)
    photos = read_jsonl(catalogue.images_path)
    (tmp_path / "src" / photos[0]["uri"]).unlink()
    (tmp_path / "src" / photos[1]["uri"]).write_bytes(b"\xff\xd8\xff not really a jpeg")
    broken = {photos[0]["image_id"]: "missing", photos[1]["image_id"]: "unsupported_format"}
    out = tmp_path / "out"
    lenient = make_config(out, "thresholds.max_error_rate=0.5", listings=catalogue.listings_path, images=catalogue.images_path, engine=engine)
    summary = pipeline.run(spark, lenient)
    images = table(lenient, IMAGE_TABLE).set_index("image_id")
    assert len(images) == len(photos)
    for image_id, row in images.iterrows():
        if image_id in broken:
            assert row["status"] == "error" and row["error"].startswith(broken[image_id]) and row["embedding"] is None
        else:
            assert row["status"] == "ok" and row["error"] is None and len(row["embedding"]) == DIM
    assert summary.tables[IMAGE_TABLE.name].errors == 2
    versions = {spec.name: DeltaTable(f"{out}/tables/{spec.name}").version() for spec in TABLES}

    # The gate judges the rows a run encodes: a full refresh encodes the broken photos again.
    strict = make_config(
        out, "thresholds.max_error_rate=0.01", "incremental.full_refresh=true",
        listings=catalogue.listings_path, images=catalogue.images_path, engine=engine,
    )
    with pytest.raises(pipeline.RunFailed) as failure:
        pipeline.run(spark, strict)
    message = str(failure.value)
    assert "listing_image_embeddings: error rate" in message and "thresholds.max_error_rate 1.0%" in message
    assert "missing x1" in message and photos[0]["listing_id"] in message
    assert {spec.name: DeltaTable(f"{out}/tables/{spec.name}").version() for spec in TABLES} == versions
    assert not any((out / "tables" / "_staging").glob("*/*")), "staging is cleaned up after a failed run"


def test_a_catalogue_without_any_photos_still_gets_text_and_listing_rows(spark, engine, tmp_path):
    catalogue = write_catalogue(tmp_path / "src", n_listings=5, seed=5)
    catalogue.images_path.write_text("")  # an empty photo export: no rows, so no schema to infer
    cfg = make_config(tmp_path, listings=catalogue.listings_path, images=catalogue.images_path, engine=engine)
    summary = pipeline.run(spark, cfg)
    assert summary.tables[IMAGE_TABLE.name].rows == 0 and len(table(cfg, IMAGE_TABLE)) == 0
    fused = table(cfg, LISTING_TABLE)
    assert len(fused) == 5 and (fused["n_images"] == 0).all() and fused["image_embedding"].isna().all()
    assert all(len(v) == DIM for v in fused["multimodal_embedding"])


def test_a_source_missing_a_contract_column_fails_naming_it(spark, tmp_path):
    catalogue = write_catalogue(tmp_path / "src", n_listings=3, seed=5)
    rows = read_jsonl(catalogue.listings_path)
    catalogue.listings_path.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "brand"}) + "\n" for r in rows))
    cfg = make_config(tmp_path, listings=catalogue.listings_path, images=catalogue.images_path)
    with pytest.raises(ValueError, match="listings.path: missing required column.s. brand"):
        pipeline.run(spark, cfg)


def test_the_gate_refuses_vectors_of_the_wrong_dimension(spark, tmp_path):
    rows = spark.createDataFrame(
        [("L1", [1.0, 0.0, 0.0, 0.0], "ok"), ("L2", [1.0, 0.0, 0.0], "ok"), ("L3", None, "error")],
        "listing_id string, embedding array<float>, status string",
    )
    good = pipeline._stage(spark, rows.where("listing_id != 'L2'"), str(tmp_path / "good"), "texts", 4, {})
    assert (good.rows, good.errors, good.wrong_dims) == (2, 1, 0)
    assert good.vectors == {"embedding": quality.VectorStats(vectors=1, non_finite=0, norm_min=1.0, norm_mean=1.0, norm_max=1.0)}
    pipeline.check_dimensions({"listing_text_embeddings": good}, 4)
    bad = pipeline._stage(spark, rows, str(tmp_path / "bad"), "texts", 4, {})
    assert (bad.rows, bad.errors, bad.wrong_dims) == (3, 1, 1)
    with pytest.raises(pipeline.RunFailed, match="listing_text_embeddings: 1 rows hold vectors that are not 4-d"):
        pipeline.check_dimensions({"listing_text_embeddings": bad}, 4)
    # In the fused table any of the three vector columns counts.
    fused = spark.createDataFrame([("L1", [1.0, 0.0, 0.0, 0.0], None, [1.0, 0.0])], "listing_id string, image_embedding array<float>, text_embedding array<float>, multimodal_embedding array<float>")
    staged = pipeline._stage(spark, fused, str(tmp_path / "fused"), "listings", 4, {})
    assert (staged.rows, staged.errors, staged.wrong_dims) == (1, 0, 1)
