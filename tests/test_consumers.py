"""Consumers of the tables: the reader API and its CLI, exact search against brute force, the Spark
neighbour table, the serving export (ANN index, Vector Search source table and index definition), the
evaluation job with its MLflow run, and the HTML report rendered in headless Chromium."""

from __future__ import annotations

import importlib.util
import inspect
import json
import re
import shutil
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
from deltalake import DeltaTable, write_deltalake
from PIL import Image

from depop_embed import evaluation, neighbours, pipeline, reader, serving
from depop_embed.reader import EmbeddingReader, read_table
from depop_embed.tables import LISTING_TABLE, NEIGHBOURS_TABLE, SEARCH_VECTORS_TABLE, TEXT_TABLE, DeltaRsWriter

from conftest import ROOT, SAMPLE, make_config, open_clip_model, read_delta

SEED0, SEED1 = "depop-tiny-clip/seed-0", "depop-tiny-clip/seed-1"
COLUMNS = {"image": "image_embedding", "text": "text_embedding", "multimodal": "multimodal_embedding"}


@pytest.fixture(scope="module")
def two_models(spark, sample_run, tmp_path_factory):
    """A copy of the sample run's tables (seed 0, current) with a second model (seed 1) written beside it."""
    sample_cfg, _ = sample_run
    tmp = tmp_path_factory.mktemp("consumers")
    shutil.copytree(sample_cfg.output.location, tmp / "tables")
    outputs = [f"serving.index_path={tmp}/serving", f"evaluation.report_dir={tmp}/reports", "evaluation.report_listings=6"]
    engine = sample_cfg.output.engine
    cfg1 = make_config(tmp, "model.seed=1", *outputs, engine=engine)
    pipeline.run(spark, cfg1)
    return make_config(tmp, *outputs, engine=engine), cfg1


def stored(location: str, model_id: str) -> pd.DataFrame:
    frame = read_delta(f"{location}/{LISTING_TABLE.name}").to_pandas()
    return frame[frame["model_id"] == model_id].reset_index(drop=True)


def brute_force(ids: list[str], matrix: np.ndarray, query: np.ndarray, k: int, exclude: str | None = None):
    """The independent expectation: every score summed in float64 and kept as float32 (the tables'
    score type: so listings with the same vector tie), best first, equal scores by listing_id."""
    scores = (np.asarray(matrix, np.float64) @ np.asarray(query, np.float64)).astype(np.float32).astype(np.float64)
    order = [i for i in sorted(range(len(ids)), key=lambda i: (-scores[i], ids[i])) if ids[i] != exclude][:k]
    return [ids[i] for i in order], scores[order], dict(zip(ids, scores))


def assert_same_ranking(got_ids, got_scores, want_ids, want_scores, all_scores):
    """Same ids in the same order and scores within 1e-5; a swap is allowed only between scores that
    float32 and float64 arithmetic cannot tell apart (1e-6)."""
    assert len(got_ids) == len(want_ids)
    np.testing.assert_allclose(np.asarray(got_scores, np.float64), want_scores, atol=1e-5)
    for got, want, score in zip(got_ids, want_ids, want_scores):
        assert got == want or abs(all_scores[got] - score) <= 1e-6, (got, want)


def active_matrix(frame: pd.DataFrame, column: str) -> tuple[list[str], np.ndarray]:
    rows = frame[frame["is_active"] & frame[column].notna()].sort_values("listing_id")
    return rows["listing_id"].tolist(), np.stack(rows[column].to_numpy())


def test_read_table_gives_the_current_model_or_a_named_one_as_arrow_pandas_or_spark(spark, two_models):
    cfg, _ = two_models
    location = cfg.output.location
    current = read_table(location, LISTING_TABLE.name)
    assert set(current["model_id"].to_pylist()) == {SEED0} and current.num_rows == 200
    other = read_table(location, LISTING_TABLE.name, model_id=SEED1).to_pandas()
    assert set(other["model_id"]) == {SEED1} and len(other) == 200
    reader = EmbeddingReader.from_config(cfg, spark)
    assert reader.current_model() == SEED0
    assert reader.spark_table(LISTING_TABLE.name, SEED1).count() == 200
    assert reader.spark_table(TEXT_TABLE.name).where("model_id != 'depop-tiny-clip/seed-0'").count() == 0
    with pytest.raises(ValueError, match="unknown table 'listings'"):
        reader.table("listings")


@pytest.mark.parametrize("by", ["image", "text", "multimodal"])
def test_similar_listings_equal_brute_force_over_active_listings(two_models, by):
    cfg, _ = two_models
    reader = EmbeddingReader.from_config(cfg)
    frame = stored(cfg.output.location, SEED0)
    ids, matrix = active_matrix(frame, COLUMNS[by])
    inactive = set(frame.loc[~frame["is_active"], "listing_id"])
    assert inactive and len(ids) < 200
    for listing_id in ids[::37]:
        found = reader.similar_listings(listing_id, 10, by)
        want_ids, want_scores, all_scores = brute_force(ids, matrix, matrix[ids.index(listing_id)], 10, exclude=listing_id)
        assert found["rank"].tolist() == list(range(1, 11))
        assert listing_id not in set(found["listing_id"]) and not inactive & set(found["listing_id"])
        assert_same_ranking(found["listing_id"].tolist(), found["score"], want_ids, want_scores, all_scores)
    with pytest.raises(KeyError, match="has no image_embedding|has no text_embedding|has no multimodal_embedding"):
        reader.similar_listings(sorted(inactive)[0], 5, by)


def test_search_embeds_the_query_with_the_text_tower_of_the_tables_model(two_models, reference_model):
    cfg, _ = two_models
    reader = EmbeddingReader.from_config(cfg)
    query = "Black Nike hoodie, size M"
    for model_id, (model, _, tokenizer) in ((SEED0, reference_model), (SEED1, open_clip_model(1))):
        with torch.inference_mode():
            expected = torch.nn.functional.normalize(model.encode_text(tokenizer([query])), dim=-1)[0].numpy()
        got = reader.embed_queries([query], model_id)[0]
        assert float(got @ expected) >= 0.9999
        ids, matrix = active_matrix(stored(cfg.output.location, model_id), "image_embedding")
        found = reader.search(query, 8, by="image", model_id=model_id)
        want_ids, want_scores, all_scores = brute_force(ids, matrix, expected, 8)
        assert_same_ranking(found["listing_id"].tolist(), found["score"], want_ids, want_scores, all_scores)
    assert float(reader.embed_queries([query], SEED0)[0] @ reader.embed_queries([query], SEED1)[0]) < 0.99


def load_job(name: str):
    spec = importlib.util.spec_from_file_location(f"job_{name}", ROOT / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_query_cli_prints_ranked_listings_with_their_text(two_models, capsys):
    cfg, _ = two_models
    cli = load_job("query_listings")
    sets = ["--config", str(ROOT / "conf" / "local.yaml"), "--set", f"output.location={cfg.output.location}",
            "--set", "model.name=depop-tiny-clip", "--set", f"model.config_path={cfg.model.config_path}"]
    assert cli.main(["similar", "L000001", *sets, "-k", "3", "--by", "image"]) == 0
    lines = capsys.readouterr().out.splitlines()
    expected = EmbeddingReader.from_config(cfg).similar_listings("L000001", 3, "image")
    assert [line.split()[2] for line in lines] == expected["listing_id"].tolist()
    assert cli.main(["search", "vintage denim jacket", *sets, "-k", "4"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 4
    assert cli.main(["similar", "L999999", *sets]) == 1
    assert "has no multimodal_embedding" in capsys.readouterr().err


# --- the neighbour table on a catalogue of >= 5,000 listings --------------------------------------------

N_ACTIVE, DIM = 5000, 32


def synthetic_listings(model_id: str, n_active: int = N_ACTIVE, seed: int = 7) -> pd.DataFrame:
    """Clustered unit vectors, like listings of a few kinds; 40 inactive listings, 25 without photos."""
    rng = np.random.default_rng(seed)
    n = n_active + 40
    centres = rng.normal(size=(30, DIM))

    def unit(m):
        return (m / np.linalg.norm(m, axis=1, keepdims=True)).astype(np.float32)

    kinds = rng.integers(0, 30, n)
    image, text = unit(centres[kinds] + 0.6 * rng.normal(size=(n, DIM))), unit(centres[kinds] + 0.6 * rng.normal(size=(n, DIM)))
    listing_ids = [f"S{i:06d}" for i in rng.permutation(n)]
    no_photo = set(range(0, 25))
    now = datetime(2026, 12, 1, tzinfo=timezone.utc)
    return pd.DataFrame({
        "listing_id": listing_ids,
        "model_id": model_id,
        "image_embedding": [None if i in no_photo else image[i] for i in range(n)],
        "text_embedding": list(text),
        "multimodal_embedding": [text[i] if i in no_photo else unit((image[i] + text[i])[None])[0] for i in range(n)],
        "n_images": [0 if i in no_photo else 2 for i in range(n)],
        "is_active": [i < n_active for i in range(n)],
        "inputs_hash": "h",
        "updated_at": now,
    })


def write_listings(location: Path, frame: pd.DataFrame, mode: str) -> None:
    writer = DeltaRsWriter(str(location))
    writer.ensure(LISTING_TABLE)
    table = pa.Table.from_pandas(frame, schema=LISTING_TABLE.arrow_schema(), preserve_index=False)
    write_deltalake(writer.location(LISTING_TABLE), table, mode=mode)
    if writer.current_model() is None:
        writer.set_current_model(frame["model_id"].iloc[0], "test")


def expected_neighbours(frame: pd.DataFrame, column: str, k: int) -> dict[str, list[str]]:
    ids, matrix = active_matrix(frame, column)
    scores = matrix @ matrix.T
    np.fill_diagonal(scores, -np.inf)
    lists = {}
    for i, listing_id in enumerate(ids):
        order = sorted(np.argpartition(-scores[i], k)[: k + 1], key=lambda j: (-scores[i, j], ids[j]))[:k]
        lists[listing_id] = [ids[j] for j in order]
    return lists


@pytest.fixture(scope="module")
def catalogue(spark, engine, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("neighbours")
    frame = synthetic_listings("synthetic/seed-7")
    write_listings(tmp / "tables", frame, "append")  # by delta-rs: the Spark engine reads it across engines
    cfg = make_config(tmp, "neighbours.block_size=1024", "neighbours.k=10", f"serving.index_path={tmp}/serving", engine=engine)
    return cfg, frame


def neighbour_rows(cfg, version: int | None = None) -> pd.DataFrame:
    return read_delta(f"{cfg.output.location}/{NEIGHBOURS_TABLE.name}", version).to_pandas()


def test_block_pairs_are_an_equi_join_of_blocks_not_a_cross_join_of_listings(spark, catalogue):
    cfg, _ = catalogue
    writer = DeltaRsWriter(cfg.output.location, spark)
    vectors = neighbours.active_vectors(writer, "synthetic/seed-7", "multimodal_embedding")
    pairs, blocks = neighbours.block_pairs(vectors, 1024)
    assert blocks == 5  # 5,000 listings in blocks of about 1,024
    plan = pairs._jdf.queryExecution().executedPlan().toString()
    assert "CartesianProduct" not in plan and "NestedLoopJoin" not in plan
    assert "SortMergeJoin [q_block" in plan or "BroadcastHashJoin [q_block" in plan
    assert pairs.count() == blocks * blocks  # 25 pair rows, against 25,000,000 listing pairs of a cross join
    sizes = [len(r["q_ids"]) for r in pairs.where("c_block = 0").select("q_ids").collect()]
    assert sum(sizes) == N_ACTIVE and max(sizes) < 1.2 * N_ACTIVE / blocks


def test_the_neighbour_table_matches_brute_force_and_syncs_only_what_changed(spark, catalogue):
    cfg, frame = catalogue
    first = neighbours.build(spark, cfg)
    assert first.changes == {"upsert": N_ACTIVE * 10} and first.rows == N_ACTIVE * 10
    rows = neighbour_rows(cfg)
    assert set(rows["model_id"]) == {"synthetic/seed-7"} and set(rows["embedding_column"]) == {"multimodal_embedding"}
    active = set(frame.loc[frame["is_active"], "listing_id"])
    assert set(rows["listing_id"]) == active and set(rows["neighbour_id"]) <= active
    assert (rows["listing_id"] != rows["neighbour_id"]).all()
    got = {lid: g.sort_values("rank")["neighbour_id"].tolist() for lid, g in rows.groupby("listing_id")}
    want = expected_neighbours(frame, "multimodal_embedding", 10)
    assert got == want  # every listing, not only a sample
    vectors = dict(zip(frame["listing_id"], frame["multimodal_embedding"]))
    sample = rows.sample(500, random_state=0)
    expected_scores = [float(np.dot(vectors[a], vectors[b])) for a, b in zip(sample["listing_id"], sample["neighbour_id"])]
    np.testing.assert_allclose(sample["score"], expected_scores, atol=1e-5)

    # Nothing changed: no new version.
    again = neighbours.build(spark, cfg)
    assert again.changes == {} and again.version == first.version

    # Ten listings sold: their rows go, and only the listings whose neighbours changed are rewritten.
    sold = sorted(active)[::500]
    changed_frame = frame.assign(is_active=frame["is_active"] & ~frame["listing_id"].isin(sold))
    write_listings(Path(cfg.output.location), changed_frame, "overwrite")
    after = neighbours.build(spark, cfg)
    assert after.version == first.version + 1
    cdf = pa.table(DeltaTable(f"{cfg.output.location}/{NEIGHBOURS_TABLE.name}").load_cdf(starting_version=after.version)).to_pandas()
    want_after = expected_neighbours(changed_frame, "multimodal_embedding", 10)
    rewritten = {lid for lid, lst in want_after.items() if lst != want[lid]}
    assert set(cdf.loc[cdf["_change_type"] == "delete", "listing_id"]) == set(sold)
    assert (cdf["_change_type"] == "delete").sum() == 10 * len(sold)
    assert set(cdf.loc[cdf["_change_type"] == "update_postimage", "listing_id"]) == rewritten
    assert rewritten and len(rewritten) < len(active) / 10
    got_after = {lid: g.sort_values("rank")["neighbour_id"].tolist() for lid, g in neighbour_rows(cfg).groupby("listing_id")}
    assert got_after == want_after


def test_the_ann_index_finds_the_exact_neighbours_and_round_trips_through_its_files(catalogue, tmp_path):
    cfg, _ = catalogue
    frame = stored(cfg.output.location, "synthetic/seed-7")  # as the tables hold it now (some sold)
    ids, matrix = active_matrix(frame, "multimodal_embedding")
    reader = EmbeddingReader(cfg.output.location)
    vectors = reader.vectors("multimodal", "synthetic/seed-7")
    assert list(vectors.ids) == ids
    index = serving.AnnIndex.build(vectors, m=32, ef_construction=200, ef_search=128)
    queries = matrix[::10]
    exact, _ = vectors.nearest(queries, 10)
    found, scores = index.search(queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, exact)])
    print(f"ANN recall@10 against exact search: {recall:.4f} over {len(queries)} queries, {len(ids)} listings")
    assert recall >= 0.95
    np.testing.assert_allclose(scores[:, 0], np.sum(queries * matrix[[ids.index(f) for f in found[:, 0]]], axis=1), atol=1e-5)
    loaded = serving.AnnIndex.load(index.save(tmp_path / "ann"))
    assert loaded.manifest == index.manifest and loaded.manifest["listings"] == len(ids)
    np.testing.assert_array_equal(loaded.search(queries, 10)[0], found)


def test_exact_search_equals_numpy_on_five_thousand_listings(catalogue):
    cfg, _ = catalogue
    frame = stored(cfg.output.location, "synthetic/seed-7")
    ids, matrix = active_matrix(frame, "image_embedding")
    vectors = EmbeddingReader(cfg.output.location).vectors("image", "synthetic/seed-7")
    rng = np.random.default_rng(1)
    queries = (lambda q: q / np.linalg.norm(q, axis=1, keepdims=True))(rng.normal(size=(20, DIM))).astype(np.float32)
    got_ids, got_scores = vectors.nearest(queries, 10)
    for q, gi, gs in zip(queries, got_ids, got_scores):
        want_ids, want_scores, _ = brute_force(ids, matrix, q, 10)
        assert list(gi) == want_ids
        np.testing.assert_allclose(gs, want_scores, atol=1e-5)


def test_equal_scores_rank_by_listing_id_in_exact_search_and_in_spark(spark, engine, tmp_path, monkeypatch):
    """Relisted items have identical vectors: ties must not depend on blocks, partitions or argpartition."""
    base = synthetic_listings("synthetic/dupes", n_active=200, seed=3)
    copies = base.iloc[:120].assign(listing_id=[f"D{i:06d}" for i in range(120)])
    frame = pd.concat([base, copies], ignore_index=True)
    write_listings(tmp_path / "tables", frame, "append")
    cfg = make_config(tmp_path, "neighbours.block_size=64", "neighbours.k=6", engine=engine)
    neighbours.build(spark, cfg)
    got = {lid: g.sort_values("rank")["neighbour_id"].tolist() for lid, g in neighbour_rows(cfg).groupby("listing_id")}
    ids, matrix = active_matrix(frame, "multimodal_embedding")
    vectors = EmbeddingReader(cfg.output.location).vectors("multimodal", "synthetic/dupes")
    exact, exact_scores = vectors.nearest(matrix, 6, exclude=ids)
    # Small blocks of queries and listings, so that copies and excluded listings fall in other blocks.
    monkeypatch.setattr(reader, "_QUERY_BLOCK", 50)
    monkeypatch.setattr(reader, "_LISTING_BLOCK", 37)
    blocked, blocked_scores = vectors.nearest(matrix, 6, exclude=ids)
    np.testing.assert_array_equal(blocked, exact)
    np.testing.assert_array_equal(blocked_scores, exact_scores)
    for i, listing_id in enumerate(ids):
        want, _, _ = brute_force(ids, matrix, matrix[i], 6, exclude=listing_id)
        assert got[listing_id] == list(exact[i]) == want, listing_id


# --- serving export, evaluation and report on the sample tables ---------------------------------------

def test_the_serving_export_writes_the_index_and_the_vector_search_source(spark, two_models):
    from databricks.sdk.service.vectorsearch import DeltaSyncVectorIndexSpecRequest, VectorSearchIndexesAPI

    cfg, _ = two_models
    result = serving.export(spark, cfg)
    frame = stored(cfg.output.location, SEED0)
    ids, matrix = active_matrix(frame, "multimodal_embedding")
    assert result.model_id == SEED0 and result.listings == len(ids)
    index = serving.AnnIndex.load(result.index_folder)
    assert index.manifest["model_id"] == SEED0 and list(index.ids) == ids
    table = DeltaTable(f"{cfg.output.location}/{SEARCH_VECTORS_TABLE.name}")
    assert table.metadata().configuration["delta.enableChangeDataFeed"] == "true"
    rows = read_delta(table.table_uri).to_pandas().sort_values("listing_id")
    assert rows["listing_id"].tolist() == ids and rows["listing_id"].is_unique and set(rows["model_id"]) == {SEED0}
    np.testing.assert_array_equal(np.stack(rows["embedding"]), matrix)
    version = table.version()
    assert serving.export(spark, cfg).search_vectors.version == version  # nothing changed: no commit

    # Another model's export writes only its index file; the served table follows the current model.
    other = serving.export(spark, cfg, SEED1)
    assert other.search_vectors is None and other.index_folder != result.index_folder
    assert DeltaTable(table.table_uri).version() == version

    definition = serving.vector_search_definition("main.depop_embed", "depop-embed", "", 512)
    spec = definition["delta_sync_index_spec"]
    assert DeltaSyncVectorIndexSpecRequest.from_dict(spec).as_dict() == spec  # the SDK's typed model, losing nothing
    assert set(definition) - {"delta_sync_index_spec"} <= set(inspect.signature(VectorSearchIndexesAPI.create_index).parameters)
    assert definition["primary_key"] == "listing_id" and SEARCH_VECTORS_TABLE.key == ("listing_id",)
    assert spec["source_table"] == "main.depop_embed.listing_search_vectors" and spec["pipeline_type"] == "TRIGGERED"
    (vector,) = spec["embedding_vector_columns"]
    column_types = {c.name: c.type for c in SEARCH_VECTORS_TABLE.columns}
    assert column_types[vector["name"]] == "vector" and vector["embedding_dimension"] == 512
    assert set(spec["columns_to_sync"]) <= set(column_types)


@pytest.fixture(scope="module")
def evaluated(spark, two_models):
    cfg, _ = two_models
    return cfg, evaluation.evaluate(spark, cfg, model_id=SEED1)


def test_the_evaluation_scores_the_candidate_and_the_current_model_and_logs_them(two_models, evaluated):
    cfg, result = evaluated
    assert result.candidate.model_id == SEED1 and result.baseline.model_id == SEED0  # the current model
    listings = pd.DataFrame([json.loads(line) for line in (SAMPLE / "listings.jsonl").read_text().splitlines()])
    for scores, seed in ((result.candidate, 1), (result.baseline, 0)):
        model, _, tokenizer = open_clip_model(seed)
        frame = stored(cfg.output.location, f"depop-tiny-clip/seed-{seed}")
        active = sorted(frame.loc[frame["is_active"], "listing_id"])
        assert scores.listings == len(active)
        titles = listings.set_index("listing_id").loc[active, "title"].tolist()
        with torch.inference_mode():
            queries = torch.nn.functional.normalize(model.encode_text(tokenizer(titles)), dim=-1).numpy()
        for by in ("image", "multimodal"):
            ids, matrix = active_matrix(frame, COLUMNS[by])
            ranks = []
            for listing_id, query in zip(active, queries):
                if listing_id in ids:
                    order = np.argsort(-(matrix @ query), kind="stable")
                    ranks.append(int(np.nonzero(np.asarray(ids)[order] == listing_id)[0][0]) + 1)
            for k in (1, 5, 10):
                assert scores.recall[by][k] == pytest.approx(np.mean(np.asarray(ranks) <= k), abs=1e-9), (seed, by, k)
        ids, matrix = active_matrix(frame, "image_embedding")
        category = listings.set_index("listing_id")["category"]
        sims = matrix @ matrix.T
        np.fill_diagonal(sims, -np.inf)
        top = np.argsort(-sims, axis=1, kind="stable")[:, :10]
        same = [(category[ids[i]] == category[[ids[j] for j in row]].to_numpy()).mean() for i, row in enumerate(top)]
        assert scores.agreement["image"]["category"] == pytest.approx(np.mean(same), abs=1e-6)
        brand = listings.set_index("listing_id")["brand"]
        branded = [i for i, listing_id in enumerate(ids) if pd.notna(brand[listing_id]) and brand[listing_id] != ""]
        same = [(brand[ids[i]] == brand[[ids[j] for j in top[i]]].to_numpy()).mean() for i in branded]
        assert 0 < len(branded) < len(ids)  # the sample has unbranded listings: they are left out
        assert scores.agreement["image"]["brand"] == pytest.approx(np.mean(same), abs=1e-6)

    run = mlflow.MlflowClient().get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.tags["depop_embed.job"] == "evaluate"
    assert run.data.params["evaluation.candidate"] == SEED1 and run.data.params["evaluation.baseline"] == SEED0
    metrics = run.data.metrics
    for role, scores in (("candidate", result.candidate), ("baseline", result.baseline)):
        for k in (1, 5, 10):
            assert metrics[f"{role}/recall_at_{k}/image"] == pytest.approx(scores.recall["image"][k])
        assert metrics[f"{role}/category_agreement_at_10/multimodal"] == pytest.approx(scores.agreement["multimodal"]["category"])
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(result.mlflow_run_id)}
    assert {"report", "evaluation.json", "config.yaml"} <= artifacts


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, "headless Chromium is needed for the report test: apt-get install chromium (make test does)"
    return found


def headless(*args: str, profile: Path) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--hide-scrollbars"]
    return subprocess.run([chromium(), *flags, *args], capture_output=True, text=True, timeout=120, check=True)


def test_the_report_renders_in_headless_chromium_with_its_photos(evaluated, tmp_path):
    cfg, result = evaluated
    page = result.report_path.resolve().as_uri()
    html = result.report_path.read_text()
    assert "http://" not in html and "https://" not in html  # self-contained
    ids, _ = active_matrix(stored(cfg.output.location, SEED1), "image_embedding")
    assert html.count("<circle") == len(ids)  # every evaluated listing with photos, in the projection
    shown = re.findall(r"<br>(L\d{6})</figcaption>", html)  # every card ends with its listing id
    assert len(shown) == 6 * (1 + cfg.evaluation.report_neighbours)
    with_photos = set(stored(cfg.output.location, SEED1).query("n_images > 0")["listing_id"])
    expected_photos = sum(listing_id in with_photos for listing_id in shown)
    assert html.count("<img ") == expected_photos > 0 and html.count('class="nophoto"') == len(shown) - expected_photos

    dom = headless("--virtual-time-budget=5000", "--dump-dom", page, profile=tmp_path / "dom").stdout
    loaded = re.search(r'data-images-loaded="(\d+)"', dom)
    assert loaded and int(loaded[1]) == expected_photos  # every photo decoded by the browser

    shot = tmp_path / "report.png"
    headless("--window-size=1400,1600", f"--screenshot={shot}", page, profile=tmp_path / "shot")
    with Image.open(shot) as image:
        grid = image.convert("RGB").crop((0, 600, 1400, 1600))  # below the figures table: the photo grid
        colours = len(set(grid.getdata()))
    print(f"report screenshot: {shot} ({colours} colours in the photo grid)")
    assert colours > 2000  # photos, not blank boxes or text alone
