"""Incremental runs: only what changed is encoded and written; kills, concurrent runs and a second model
leave the tables whole. Real Spark, real Delta tables on both engines, the job run as a process where a
process is what the case is about."""

from __future__ import annotations

import importlib.util
import shutil
import signal
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from deltalake import DeltaTable

from depop_embed import pipeline
from depop_embed.reader import read_table
from depop_embed.sample_catalogue import write_catalogue
from depop_embed.tables import IMAGE_TABLE, LISTING_TABLE, TABLES, TEXT_TABLE, open_writer

from conftest import ROOT, SAMPLE, TRACKING, make_config, read_delta
from hostile_corpus import read_jsonl, write_jsonl

MODEL = "depop-tiny-clip/seed-0"
TIMESTAMPS = ("embedded_at", "updated_at", "inputs_hash")  # differ between two runs of the same work




def versions(cfg) -> dict[str, int]:
    return {s.name: DeltaTable(f"{cfg.output.location}/{s.name}").version() for s in TABLES}


def frame(cfg, spec, version=None) -> pd.DataFrame:
    df = read_delta(f"{cfg.output.location}/{spec.name}", version).to_pandas()
    return df.set_index(list(spec.key)).sort_index()


def changes(cfg, spec, since: int) -> dict[str, set]:
    """Change Data Feed after version `since`: change type -> keys."""
    cdf = pa.table(DeltaTable(f"{cfg.output.location}/{spec.name}").load_cdf(starting_version=since + 1)).to_pylist()
    out: dict[str, set] = {}
    for row in cdf:
        out.setdefault(row["_change_type"], set()).add(tuple(row[k] for k in spec.key if k != "model_id"))
    return out


def edit_sources(src: Path) -> dict[str, list]:
    """The issue's edit: 5 descriptions, 3 new listings, 1 photo replaced, 1 removed, 4 sold; disjoint listings."""
    listings, photos = read_jsonl(src / "listings.jsonl"), read_jsonl(src / "listing_images.jsonl")
    later = (datetime.now(timezone.utc) + timedelta(minutes=1)).isoformat()
    by_listing: dict[str, list] = {}
    for p in photos:
        by_listing.setdefault(p["listing_id"], []).append(p)
    active = [r for r in listings if r["status"] == "active" and len(by_listing.get(r["listing_id"], [])) >= 2]
    edited, replaced_in, removed_in, sold = active[:5], active[5], active[6], active[7:11]
    for r in edited:
        r["description"] = (r["description"] or "") + " Price drop!"
        r["updated_at"] = later
    for r in sold:
        r["status"], r["updated_at"] = "sold", later
    # Replace: new bytes under the same URI (another listing's photo).
    replaced = by_listing[replaced_in["listing_id"]][0]
    donor = by_listing[active[12]["listing_id"]][0]
    shutil.copyfile(src / donor["uri"], src / replaced["uri"])
    replaced["updated_at"] = later
    removed = by_listing[removed_in["listing_id"]][-1]
    photos.remove(removed)
    added = []
    for n in range(3):
        new = dict(active[20 + n], listing_id=f"N{n:05d}", title=f"New listing {n}", updated_at=later)
        listings.append(new)
        added.append(new)
        for k in range(n):  # 0, 1 and 2 photos
            photos.append({"listing_id": new["listing_id"], "image_id": f"N{n:05d}-{k}", "position": k,
                           "uri": by_listing[active[30 + k]["listing_id"]][0]["uri"], "updated_at": later})
    write_jsonl(src / "listings.jsonl", listings)
    write_jsonl(src / "listing_images.jsonl", photos)
    return {
        "edited": [r["listing_id"] for r in edited],
        "added": [r["listing_id"] for r in added],
        "new_photos": [(p["listing_id"], p["image_id"]) for p in photos if p["listing_id"].startswith("N")],
        "replaced": [(replaced["listing_id"], replaced["image_id"])],
        "removed": [(removed["listing_id"], removed["image_id"])],
        "sold": [r["listing_id"] for r in sold],
    }


def sample_copy(tmp: Path) -> Path:
    src = tmp / "src"
    shutil.copytree(SAMPLE, src)
    return src


def config_for(tmp: Path, src: Path, engine: str, *overrides: str):
    return make_config(tmp, *overrides, listings=src / "listings.jsonl", images=src / "listing_images.jsonl", engine=engine)


def test_a_rerun_encodes_and_writes_exactly_what_changed(spark, engine, tmp_path):
    src = sample_copy(tmp_path)
    cfg = config_for(tmp_path, src, engine)
    first = pipeline.run(spark, cfg)
    assert (first.stats["texts"], first.stats["images"]) == (200, 497)
    before = versions(cfg)
    old = {spec.name: frame(cfg, spec) for spec in TABLES}

    edit = edit_sources(src)
    second = pipeline.run(spark, cfg)

    # Encoder inputs: the edited and new texts; the new and the replaced photos.
    assert second.stats["texts"] == len(edit["edited"]) + len(edit["added"]) == 8
    assert second.stats["images"] == len(edit["new_photos"]) + len(edit["replaced"]) == 4
    after = versions(cfg)
    assert all(after[n] == before[n] + 1 for n in before), (before, after)  # one commit per table

    assert changes(cfg, IMAGE_TABLE, before[IMAGE_TABLE.name]) == {
        "insert": set(edit["new_photos"]),
        "update_preimage": set(edit["replaced"]),
        "update_postimage": set(edit["replaced"]),
        "delete": set(edit["removed"]),
    }
    assert changes(cfg, TEXT_TABLE, before[TEXT_TABLE.name]) == {
        "insert": {(i,) for i in edit["added"]},
        "update_preimage": {(i,) for i in edit["edited"]},
        "update_postimage": {(i,) for i in edit["edited"]},
    }
    refused_listings = {(lid,) for lid, _ in edit["replaced"] + edit["removed"]}
    updated = {(i,) for i in edit["edited"] + edit["sold"]} | refused_listings
    assert changes(cfg, LISTING_TABLE, before[LISTING_TABLE.name]) == {
        "insert": {(i,) for i in edit["added"]},
        "update_preimage": updated,
        "update_postimage": updated,
    }

    new = {spec.name: frame(cfg, spec) for spec in TABLES}
    images, texts, fused = new[IMAGE_TABLE.name], new[TEXT_TABLE.name], new[LISTING_TABLE.name]
    # Untouched rows keep their vectors and their timestamps.
    untouched_photos = old[IMAGE_TABLE.name].index.difference(pd.MultiIndex.from_tuples(
        [(lid, iid, MODEL) for lid, iid in edit["replaced"] + edit["removed"]]))
    pd.testing.assert_series_equal(images.loc[untouched_photos, "embedded_at"], old[IMAGE_TABLE.name].loc[untouched_photos, "embedded_at"])
    changed_listings = {i for i in edit["edited"] + edit["sold"]} | {lid for (lid,) in refused_listings}
    untouched = [k for k in old[LISTING_TABLE.name].index if k[0] not in changed_listings]
    pd.testing.assert_frame_equal(fused.loc[untouched], old[LISTING_TABLE.name].loc[untouched])
    assert len(untouched) == 200 - 11
    # What changed changed the right way.
    for lid in edit["sold"]:
        assert not fused.loc[(lid, MODEL), "is_active"]
        assert np.allclose(fused.loc[(lid, MODEL), "multimodal_embedding"], old[LISTING_TABLE.name].loc[(lid, MODEL), "multimodal_embedding"])
    for lid in edit["edited"]:
        assert texts.loc[(lid, MODEL), "text"].endswith("Price drop!")
        assert texts.loc[(lid, MODEL), "embedded_at"] > old[TEXT_TABLE.name].loc[(lid, MODEL), "embedded_at"]
    (lid, iid), = edit["replaced"]
    assert images.loc[(lid, iid, MODEL), "content_hash"] != old[IMAGE_TABLE.name].loc[(lid, iid, MODEL), "content_hash"]
    (lid, iid), = edit["removed"]
    assert fused.loc[(lid, MODEL), "n_images"] == old[LISTING_TABLE.name].loc[(lid, MODEL), "n_images"] - 1
    assert {n: fused.loc[(n, MODEL), "n_images"] for n in edit["added"]} == {"N00000": 0, "N00001": 1, "N00002": 2}

    third = pipeline.run(spark, cfg)
    assert third.stats.get("texts", 0) == third.stats.get("images", 0) == 0
    assert versions(cfg) == after, "a rerun without source changes adds no table version"
    assert all(not t.changes for t in third.tables.values())


def test_a_listing_gone_from_the_source_is_deactivated_then_purged_after_the_retention(spark, engine, tmp_path):
    catalogue = write_catalogue(tmp_path / "src", n_listings=6, seed=11)
    cfg = make_config(tmp_path, listings=catalogue.listings_path, images=catalogue.images_path, engine=engine)
    pipeline.run(spark, cfg)
    listings = read_jsonl(catalogue.listings_path)
    gone = listings.pop(0)["listing_id"]
    write_jsonl(catalogue.listings_path, listings)

    pipeline.run(spark, cfg)
    fused = frame(cfg, LISTING_TABLE)
    assert not fused.loc[(gone, MODEL), "is_active"] and fused["is_active"].sum() == sum(r["status"] == "active" for r in listings)
    assert gone in frame(cfg, IMAGE_TABLE).index.get_level_values(0), "photos stay until the retention ends"

    pipeline.run(spark, make_config(tmp_path, "incremental.retention_days=0", listings=catalogue.listings_path, images=catalogue.images_path, engine=engine))
    for spec in TABLES:
        assert gone not in frame(cfg, spec).index.get_level_values(0), spec.name
    assert len(frame(cfg, LISTING_TABLE)) == 5


def load_job(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_job(cfg_args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "embed_listings.py"), "--config", str(ROOT / "conf" / "local.yaml"), *cfg_args],
        cwd=ROOT, capture_output=True, text=True, timeout=600, start_new_session=True, **kwargs,
    )


def job_args(tmp: Path, src: Path, engine: str, *overrides: str) -> list[str]:
    sets = [
        f"output.engine={engine}",
        f"listings.path={src / 'listings.jsonl'}", f"images.path={src / 'listing_images.jsonl'}",
        f"output.location={tmp / 'tables'}", "model.name=depop-tiny-clip",
        f"model.config_path={ROOT / 'tests' / 'assets' / 'depop-tiny-clip.json'}", "model.seed=0",
        "spark.master=local[2]", "spark.conf.spark.sql.shuffle.partitions=4", *TRACKING, *overrides,
    ]
    return [arg for s in sets for arg in ("--set", s)]


def contents(cfg, spec) -> pd.DataFrame:
    df = frame(cfg, spec).drop(columns=[c for c in TIMESTAMPS if c in frame(cfg, spec).columns])
    for column in [c for c in df.columns if c.endswith("embedding")]:
        df[column] = [None if v is None else np.round(np.asarray(v, dtype=np.float64), 5).tolist() for v in df[column]]
    return df


def test_a_run_killed_while_committing_leaves_whole_versions_and_the_next_run_finishes_the_work(spark, engine, tmp_path):
    src = write_catalogue(tmp_path / "src", n_listings=64, seed=17, photo_size=(96, 120)).listings_path.parent
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    killed_cfg, clean_cfg = config_for(killed, src, engine), config_for(clean, src, engine)
    pipeline.run(spark, killed_cfg)
    shutil.copytree(killed / "tables", clean / "tables")
    edit_sources(src)
    before = versions(killed_cfg)

    # SIGKILL just before the first commit: every table stays at its version, and readable.
    result = run_job(job_args(killed, src, engine, f"faults.kill_before_commit={IMAGE_TABLE.name}"))
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    assert versions(killed_cfg) == before
    assert all(len(frame(killed_cfg, spec)) for spec in TABLES)
    # SIGKILL between two commits: the photo table moved one whole version, the others did not.
    result = run_job(job_args(killed, src, engine, f"faults.kill_before_commit={TEXT_TABLE.name}"))
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    partial = versions(killed_cfg)
    assert partial == {**before, IMAGE_TABLE.name: before[IMAGE_TABLE.name] + 1}

    finished = pipeline.run(spark, killed_cfg)
    assert finished.stats.get("images", 0) == 0 and finished.stats["texts"] == 8  # the photos were already committed
    pipeline.run(spark, clean_cfg)
    for spec in TABLES:
        pd.testing.assert_frame_equal(contents(killed_cfg, spec), contents(clean_cfg, spec), check_exact=False, atol=1e-5)


def test_two_runs_at_once_never_duplicate_rows(engine, tmp_path):
    catalogue = write_catalogue(tmp_path / "src", n_listings=30, seed=21)
    src = catalogue.listings_path.parent
    jobs = [
        subprocess.Popen(
            [sys.executable, str(ROOT / "jobs" / "embed_listings.py"), "--config", str(ROOT / "conf" / "local.yaml"),
             *job_args(tmp_path, src, engine)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )
        for _ in range(2)
    ]
    outputs = [(job.wait(timeout=600), job.stdout.read()) for job in jobs]
    codes = sorted(code for code, _ in outputs)
    assert codes[0] == 0, outputs[0][1][-3000:]
    for code, output in outputs:
        assert code == 0 or (code == 1 and "another run is writing model" in output), output[-3000:]
    cfg = make_config(tmp_path, listings=catalogue.listings_path, images=catalogue.images_path, engine=engine)
    for spec in TABLES:
        rows = frame(cfg, spec)
        assert rows.index.is_unique, spec.name
    assert len(frame(cfg, LISTING_TABLE)) == 30
    assert len(frame(cfg, IMAGE_TABLE)) == catalogue.n_photos


def test_two_models_side_by_side_and_current_names_one(spark, engine, tmp_path):
    catalogue = write_catalogue(tmp_path / "src", n_listings=8, seed=13)
    first = make_config(tmp_path, listings=catalogue.listings_path, images=catalogue.images_path, engine=engine)
    second = make_config(tmp_path, "model.seed=1", listings=catalogue.listings_path, images=catalogue.images_path, engine=engine)
    pipeline.run(spark, first)
    reads_before = read_table(str(tmp_path / "tables"), LISTING_TABLE.name)
    backfill = pipeline.run(spark, second)
    assert backfill.stats["texts"] == 8, "a new model re-embeds everything for itself"

    fused = frame(first, LISTING_TABLE)
    assert set(fused.index.get_level_values("model_id")) == {MODEL, "depop-tiny-clip/seed-1"} and len(fused) == 16
    current = read_table(str(tmp_path / "tables"), LISTING_TABLE.name)
    assert set(current.column("model_id").to_pylist()) == {MODEL}
    assert current.sort_by("listing_id").equals(reads_before.sort_by("listing_id")), "the backfill did not disturb reads"

    set_current_model = load_job("set_current_model")  # the one command
    assert set_current_model.main(["--config", str(ROOT / "conf" / "local.yaml"), f"--set=output.location={tmp_path / 'tables'}",
                                   f"--set=output.engine={engine}", "--set=spark.master=local[2]", "--model-id", "depop-tiny-clip/seed-1"]) == 0
    switched = read_table(str(tmp_path / "tables"), LISTING_TABLE.name)
    assert set(switched.column("model_id").to_pylist()) == {"depop-tiny-clip/seed-1"} and switched.num_rows == 8
    assert open_writer(spark, first).model_history() == ["depop-tiny-clip/seed-1", MODEL]
    with pytest.raises(pipeline.RunFailed, match="has no rows"):
        pipeline.set_current_model(spark, first, "depop-tiny-clip/seed-9", "test")
