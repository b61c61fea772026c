"""Spark's own Delta connector, as production uses it, beside delta-rs: the connector loads the standard
way (or the run falls back, or fails at start), both engines write the same tables and read each
other's (deletion vectors included), and each finding of the issue that put Spark's Delta to work
here has a test that failed before its fix."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from deltalake import DeltaTable

from depop_embed import neighbours, pipeline, session
from depop_embed.reader import EmbeddingReader
from depop_embed.sample_catalogue import write_catalogue
from depop_embed.session import DELTA_EXTENSION, get_spark, has_delta_connector, resolve_engine
from depop_embed.tables import (
    IMAGE_TABLE, LISTING_TABLE, TABLES, TEXT_TABLE, Commit, DeltaRsWriter, SparkDeltaWriter, commit_info, open_writer,
)

from conftest import ROOT, TINY_MODEL, TRACKING, make_config, read_delta
from hostile_corpus import read_jsonl, write_jsonl

JOB = str(ROOT / "jobs" / "embed_listings.py")
MODEL = "depop-tiny-clip/seed-0"
TIMES = ("embedded_at", "updated_at", "inputs_hash")  # differ between two runs of the same work




def catalogue_config(tmp: Path, engine: str, *overrides: str, n: int = 10, seed: int = 31):
    catalogue = write_catalogue(tmp / "src", n_listings=n, seed=seed, photo_size=(96, 120))
    return catalogue, make_config(tmp, *overrides, listings=catalogue.listings_path, images=catalogue.images_path, engine=engine)


def contents(location: str, spec) -> pd.DataFrame:
    """A table's rows without the run's timestamps, keyed and sorted, vectors as float64 lists."""
    frame = read_delta(f"{location}/{spec.name}").to_pandas().drop(columns=[c for c in TIMES if c in spec.column_names])
    return frame.set_index(list(spec.key)).sort_index()


def assert_same_contents(left: pd.DataFrame, right: pd.DataFrame) -> None:
    assert list(left.index) == list(right.index)
    for column in left.columns:
        if column.endswith("embedding"):
            for a, b in zip(left[column], right[column]):
                assert (a is None) == (b is None)
                if a is not None:
                    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), atol=1e-6)
        else:
            pd.testing.assert_series_equal(left[column], right[column], check_dtype=False)


def job(*sets: str, cwd: Path = ROOT, launcher: list[str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYSPARK")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    args = [arg for s in sets for arg in ("--set", s)]
    return subprocess.run(
        [*(launcher or [sys.executable]), JOB, "--config", str(ROOT / "conf" / "local.yaml"), *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )


def tiny_job_sets(tmp: Path, catalogue, location: str) -> list[str]:
    return [
        f"listings.path={catalogue.listings_path}", f"images.path={catalogue.images_path}",
        f"output.location={location}", "model.name=depop-tiny-clip", f"model.config_path={TINY_MODEL}",
        "model.seed=0", "spark.master=local[1]", "spark.conf.spark.sql.shuffle.partitions=2", *TRACKING,
    ]


# -- the connector -------------------------------------------------------------------------------


def test_the_session_loads_deltas_connector_for_the_installed_pair_and_auto_picks_it(spark, tmp_path):
    from delta import configure_spark_with_delta_pip
    from pyspark.sql import SparkSession

    # The standard coordinate (delta-spark's own helper) for the installed pyspark/delta-spark pair.
    standard = configure_spark_with_delta_pip(SparkSession.builder)._options["spark.jars.packages"]
    assert session.delta_package() == standard
    assert has_delta_connector(spark)
    assert spark._jvm.org.apache.spark.util.Utils.classIsLoadable(DELTA_EXTENSION)
    local = make_config(tmp_path)
    assert resolve_engine(spark, local) == "spark"
    assert resolve_engine(spark, make_config(tmp_path, "output.engine=delta-rs")) == "delta-rs"
    # Fetched once: the jars Spark resolved are recorded in the Ivy cache for later sessions.
    record = json.loads((Path(spark.conf.get("spark.jars.ivy")) / "depop-embed-delta-jars.json").read_text())
    assert record["package"] == standard and any("delta-spark" in jar for jar in record["jars"])
    assert all(Path(jar.removeprefix("file:")).is_file() for jar in record["jars"])


def offline_ivy(tmp: Path) -> list[str]:
    """Spark settings under which Ivy can reach no repository: an empty cache, and one resolver on a
    closed port of 127.0.0.1 (nothing else is ever asked)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = tmp / "ivysettings.xml"
    settings.write_text(
        f'<ivysettings><settings defaultResolver="offline"/><caches defaultCacheDir="{tmp}/ivy-cache"/>'
        f'<resolvers><ibiblio name="offline" m2compatible="true" root="http://127.0.0.1:{port}/maven2/"/></resolvers></ivysettings>'
    )
    return [f"spark.conf.spark.jars.ivy={tmp / 'ivy'}", f"spark.conf.spark.jars.ivySettings={settings}"]


def test_without_a_loadable_connector_auto_falls_back_and_spark_fails_at_start(tmp_path):
    catalogue = write_catalogue(tmp_path / "src", n_listings=4, seed=3, photo_size=(96, 120))
    auto = job(*tiny_job_sets(tmp_path, catalogue, str(tmp_path / "auto")), *offline_ivy(tmp_path))
    assert auto.returncode == 0, auto.stderr[-3000:]
    assert "Delta's Spark connector is not available (Spark could not resolve io.delta:delta-spark_" in auto.stderr
    assert "delta-rs engine" in auto.stdout
    assert DeltaTable(str(tmp_path / "auto" / LISTING_TABLE.name)).version() == 1

    refused = job(*tiny_job_sets(tmp_path, catalogue, str(tmp_path / "spark")), *offline_ivy(tmp_path), "output.engine=spark")
    assert refused.returncode != 0
    assert "output.engine: spark needs Delta's Spark connector" in refused.stderr
    assert "output.engine: delta-rs" in refused.stderr, "the message names the fixes"
    assert not (tmp_path / "spark").exists(), "it failed before reading or writing anything"


def test_get_spark_reuses_a_running_session_and_pushes_no_local_settings_into_it(spark, tmp_path):
    # As on Databricks: a session exists (here one the test process made) but is not this thread's active one.
    cfg = make_config(tmp_path, "spark.conf.spark.sql.shuffle.partitions=13", "output.engine=delta-rs")
    got = []
    thread = threading.Thread(target=lambda: got.append(get_spark(cfg)))
    thread.start()
    thread.join()
    assert got[0].sparkContext is spark.sparkContext
    assert spark.conf.get("spark.sql.shuffle.partitions") != "13"
    assert spark.conf.get("spark.sql.catalog.spark_catalog") == session.DELTA_CATALOG


# -- one suite, two engines ----------------------------------------------------------------------


def test_both_engines_write_the_same_tables_from_the_same_inputs(spark, tmp_path):
    catalogue = write_catalogue(tmp_path / "src", n_listings=12, seed=41, photo_size=(96, 120))
    locations = {}
    for engine in ("delta-rs", "spark"):
        cfg = make_config(tmp_path / engine, listings=catalogue.listings_path, images=catalogue.images_path, engine=engine)
        pipeline.run(spark, cfg)
        locations[engine] = cfg.output.location
    for spec in TABLES:
        assert_same_contents(contents(locations["delta-rs"], spec), contents(locations["spark"], spec))


def test_spark_tables_with_deletion_vectors_read_the_same_through_delta_rs_and_back(spark, tmp_path):
    catalogue, cfg = catalogue_config(tmp_path, "spark", n=12)
    pipeline.run(spark, cfg)
    photos, listings = read_jsonl(catalogue.images_path), read_jsonl(catalogue.listings_path)
    removed = photos.pop(0)
    write_jsonl(catalogue.images_path, photos)
    gone = listings.pop(-1)["listing_id"]
    write_jsonl(catalogue.listings_path, listings)
    pipeline.run(spark, make_config(
        tmp_path, "incremental.retention_days=0", listings=catalogue.listings_path, images=catalogue.images_path, engine="spark",
    ))
    pipeline.run(spark, make_config(  # the listing left the source: deactivated, then purged (retention 0)
        tmp_path, "incremental.retention_days=0", listings=catalogue.listings_path, images=catalogue.images_path, engine="spark",
    ))
    location = cfg.output.location
    images = DeltaTable(f"{location}/{IMAGE_TABLE.name}")
    assert "deletionVectors" in (images.protocol().reader_features or [])
    assert pa.table(images.deletion_vectors()).num_rows, "Spark's MERGE deleted rows with deletion vectors"

    by_spark, by_rs = SparkDeltaWriter(spark, location, False), DeltaRsWriter(location, spark)
    for spec in TABLES:
        version = by_spark.version(spec)
        assert by_rs.version(spec) == version
        spark_rows = by_spark.read(spec, version).toPandas().set_index(list(spec.key)).sort_index()
        rs_rows = by_rs.read(spec, version).toPandas().set_index(list(spec.key)).sort_index()
        arrow_rows = read_delta(f"{location}/{spec.name}").to_pandas().set_index(list(spec.key)).sort_index()
        assert list(spark_rows.index) == list(rs_rows.index) == list(arrow_rows.index), spec.name
        assert gone not in spark_rows.index.get_level_values("listing_id")
    keys = set(by_rs.read(IMAGE_TABLE, by_rs.version(IMAGE_TABLE)).select("listing_id", "image_id").toPandas().itertuples(index=False))
    assert (removed["listing_id"], removed["image_id"]) not in keys
    # The JVM-less reader sees the same rows; and a delta-rs run over the same tables finds nothing to do.
    assert EmbeddingReader(location).table(LISTING_TABLE.name).num_rows == len(listings)
    before = {spec.name: by_rs.version(spec) for spec in TABLES}
    rerun = pipeline.run(spark, make_config(
        tmp_path, "incremental.retention_days=0", listings=catalogue.listings_path, images=catalogue.images_path, engine="delta-rs",
    ))
    assert rerun.stats.get("texts", 0) == rerun.stats.get("images", 0) == 0
    assert {spec.name: by_rs.version(spec) for spec in TABLES} == before


def test_tables_delta_rs_wrote_are_read_and_continued_by_spark(spark, tmp_path):
    catalogue, cfg = catalogue_config(tmp_path, "delta-rs", n=8)
    pipeline.run(spark, cfg)
    location = cfg.output.location
    by_spark = SparkDeltaWriter(spark, location, False)
    for spec in TABLES:
        assert by_spark.read(spec, by_spark.version(spec)).count() == read_delta(f"{location}/{spec.name}").num_rows
    rerun = pipeline.run(spark, make_config(tmp_path, listings=catalogue.listings_path, images=catalogue.images_path, engine="spark"))
    assert rerun.engine == "spark" and rerun.stats.get("texts", 0) == 0 and not any(t.changes for t in rerun.tables.values())


# -- the findings ----------------------------------------------------------------------------------


def test_a_relative_output_location_works_on_spark(tmp_path):
    """Finding 1: `delta.`<path>`` needs an absolute path; the default location is relative."""
    catalogue = write_catalogue(tmp_path / "src", n_listings=4, seed=5, photo_size=(96, 120))
    result = job(*tiny_job_sets(tmp_path, catalogue, "relative/tables"), "output.engine=spark", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "spark engine" in result.stdout
    for spec in TABLES:
        assert DeltaTable(str(tmp_path / "relative" / "tables" / spec.name)).version() == 1


@pytest.fixture
def catalog_schema(spark):
    """A schema of Spark's own catalog standing in for a Unity Catalog one."""
    spark.sql("CREATE SCHEMA IF NOT EXISTS spark_catalog.depop_uc")
    yield "spark_catalog.depop_uc"
    spark.sql("DROP SCHEMA IF EXISTS spark_catalog.depop_uc CASCADE")


def test_unity_catalog_tables_get_current_views_as_the_tables_appear(spark, tmp_path, catalog_schema):
    """Finding 2: the neighbours view is made when its table exists, not on the first embed run (where
    it failed, and the failure was swallowed)."""
    catalogue = write_catalogue(tmp_path / "src", n_listings=8, seed=9, photo_size=(96, 120))
    cfg = make_config(
        tmp_path, f"output.location={catalog_schema}", f"output.staging_path={tmp_path / 'staging'}", "neighbours.k=3",
        listings=catalogue.listings_path, images=catalogue.images_path,
    )
    pipeline.run(spark, cfg)
    views = {t.name for t in spark.catalog.listTables("spark_catalog.depop_uc") if t.tableType == "VIEW"}
    assert views == {f"{spec.name}_current" for spec in TABLES}
    neighbours.build(spark, cfg)
    current = spark.table("spark_catalog.depop_uc.listing_neighbours_current")
    active = sum(r["status"] not in ("sold", "deleted") for r in read_jsonl(catalogue.listings_path))
    assert current.count() == active * 3 and {r["model_id"] for r in current.collect()} == {MODEL}

    second = make_config(
        tmp_path, f"output.location={catalog_schema}", f"output.staging_path={tmp_path / 'staging'}", "model.seed=1",
        listings=catalogue.listings_path, images=catalogue.images_path,
    )
    pipeline.run(spark, second)
    pipeline.set_current_model(spark, second, "depop-tiny-clip/seed-1", "test")
    assert {r["model_id"] for r in spark.table("spark_catalog.depop_uc.listing_embeddings_current").collect()} == {"depop-tiny-clip/seed-1"}
    assert open_writer(spark, cfg).model_history() == ["depop-tiny-clip/seed-1", MODEL]


def test_catalog_names_with_hyphens_are_quoted_in_every_statement(spark):
    """Finding 8: Unity Catalog names may hold hyphens (a dev schema named after its user); unquoted,
    Spark cannot parse them. Spark's local catalog refuses such names, so this checks that every
    statement the writer makes with them parses and asks the catalog, which finds nothing."""
    writer = SparkDeltaWriter(spark, "spark_catalog.dev-ana-lopez", True)
    assert writer.ident(LISTING_TABLE) == "`spark_catalog`.`dev-ana-lopez`.`listing_embeddings`"
    assert writer.ident(LISTING_TABLE, "_current") == "`spark_catalog`.`dev-ana-lopez`.`listing_embeddings_current`"
    with pytest.raises(Exception, match="INVALID_IDENTIFIER"):
        spark.sql("SELECT * FROM spark_catalog.dev-ana-lopez.listing_embeddings")
    with pytest.raises(Exception, match="(CATALOG|TABLE_OR_VIEW)_NOT_FOUND|REQUIRES_SINGLE_PART_NAMESPACE"):
        spark.sql(f"SELECT * FROM {writer.ident(LISTING_TABLE)}").collect()
    assert writer.version(LISTING_TABLE) is None and writer.current_model() is None and writer.model_history() == []
    with pytest.raises(ValueError, match="schema spark_catalog.dev-ana-lopez does not exist"):
        writer.check_location()


def test_a_missing_unity_catalog_schema_fails_before_anything_is_encoded(spark, tmp_path):
    catalogue = write_catalogue(tmp_path / "src", n_listings=2, seed=9, photo_size=(96, 120))
    cfg = make_config(
        tmp_path, "output.location=spark_catalog.no_such_schema", f"output.staging_path={tmp_path / 'staging'}",
        listings=catalogue.listings_path, images=catalogue.images_path,
    )
    with pytest.raises(ValueError, match="schema spark_catalog.no_such_schema does not exist"):
        pipeline.run(spark, cfg)
    assert not (tmp_path / "staging").exists()


class HeldMerge(SparkDeltaWriter):
    """Spark's writer whose first MERGE is held, by its source rows, until another commit has landed."""

    def __init__(self, spark, location: str, gate: Path):
        super().__init__(spark, location, False)
        self.gate = gate

    def merge_source(self, spec, staged_path):
        from pyspark.sql import functions as F

        gate = str(self.gate)

        @F.udf("string")
        def held(value):
            import os
            import time

            open(gate + ".waiting", "w").close()
            while not os.path.exists(gate + ".open"):
                time.sleep(0.05)
            return value

        # One task holds (local[2] has two slots): the other commit needs the second.
        return super().merge_source(spec, staged_path).coalesce(1).withColumn("listing_id", held("listing_id"))


def stage_text_rows(spark, path: Path, model_id: str, ids: list[str]) -> str:
    from depop_embed import merge_source

    rows = spark.createDataFrame(
        [(i, model_id, f"text {i}", f"hash {i}", "v1", [1.0, 0.0], "ok", None, datetime.now(timezone.utc)) for i in ids],
        "listing_id string, model_id string, text string, text_hash string, template_version string, "
        "embedding array<float>, status string, error string, embedded_at timestamp",
    )
    merge_source.stage(merge_source.union(TEXT_TABLE, (rows, "upsert")), str(path))
    return str(path)


def test_a_commit_conflict_with_another_models_run_is_retried(spark, tmp_path, caplog):
    """Finding 4: Delta's ConcurrentAppendException is a conflict to retry (as on delta-rs), not a crash."""
    location = str(tmp_path / "tables")
    writer = SparkDeltaWriter(spark, location, False)
    writer.ensure(TEXT_TABLE)
    read_version = writer.version(TEXT_TABLE)
    mine = stage_text_rows(spark, tmp_path / "mine", "model-a", ["L1", "L2"])
    theirs = stage_text_rows(spark, tmp_path / "theirs", "model-b", ["L1", "L3"])
    held, outcome = HeldMerge(spark, location, tmp_path / "gate"), {}

    def commit_mine():
        try:
            outcome["version"] = held.merge(TEXT_TABLE, mine, read_version, Commit({"depop_embed.model_id": "model-a"}, "model-a"))
        except Exception as exc:  # noqa: BLE001 - reported below
            outcome["error"] = exc

    thread = threading.Thread(target=commit_mine)
    thread.start()
    deadline = time.monotonic() + 300
    while not (tmp_path / "gate.waiting").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (tmp_path / "gate.waiting").exists(), "the held MERGE never read its source"
    writer.merge(TEXT_TABLE, theirs, read_version, Commit({"depop_embed.model_id": "model-b"}, "model-b"))
    (tmp_path / "gate.open").touch()
    thread.join(timeout=300)
    assert "error" not in outcome, outcome.get("error")
    assert "conflicted" in caplog.text, "the first attempt met the other model's commit"
    rows = read_delta(f"{location}/{TEXT_TABLE.name}").to_pandas()
    assert sorted(zip(rows["listing_id"], rows["model_id"])) == [("L1", "model-a"), ("L1", "model-b"), ("L2", "model-a"), ("L3", "model-b")]
    history = DeltaTable(f"{location}/{TEXT_TABLE.name}").history()
    assert [commit_info(h).get("depop_embed.model_id") for h in history[:2]] == ["model-a", "model-b"]


def test_the_pointers_history_survives_log_cleanup(spark, engine, tmp_path):
    """Finding 6: VACUUM and log cleanup erase the Change Data Feed the history was read from."""
    writer = open_writer(spark, make_config(tmp_path, engine=engine))
    for model_id in ("model-a", "model-b", "model-c"):
        writer.set_current_model(model_id, "test")
    log_dir = tmp_path / "tables" / "current_model" / "_delta_log"
    DeltaTable(str(log_dir.parent)).create_checkpoint()
    latest = DeltaTable(str(log_dir.parent)).version()
    for old in log_dir.glob("*.json"):  # what log cleanup leaves: the checkpoint and what follows it
        if int(old.stem) < latest:
            old.unlink()
    assert writer.model_history() == ["model-c", "model-b"]
    assert writer.current_model() == "model-c"
    writer.set_current_model("model-c", "again")  # setting the same model keeps the one before it
    assert writer.model_history() == ["model-c", "model-b"]


def test_another_writers_plain_text_commit_metadata_is_no_run_of_ours(spark, engine, tmp_path):
    """Finding 7: userMetadata is free text for other writers."""
    writer = open_writer(spark, make_config(tmp_path, engine=engine))
    writer.merge(TEXT_TABLE, stage_text_rows(spark, tmp_path / "first", "model-a", ["L1"]), None, Commit({"depop_embed.model_id": "model-a"}, "model-a"))
    read_version = writer.version(TEXT_TABLE)
    spark.conf.set("spark.databricks.delta.commitInfo.userMetadata", "nightly compaction, see ticket 42")
    try:
        spark.sql(f"UPDATE delta.`{tmp_path / 'tables' / TEXT_TABLE.name}` SET template_version = 'v1' WHERE listing_id = 'L1'")
    finally:
        spark.conf.unset("spark.databricks.delta.commitInfo.userMetadata")
    version = writer.merge(TEXT_TABLE, stage_text_rows(spark, tmp_path / "second", "model-a", ["L2"]), read_version, Commit({"depop_embed.model_id": "model-a"}, "model-a"))
    assert version == read_version + 2


def test_a_run_whose_clock_is_behind_the_last_one_still_commits(spark, engine, tmp_path):
    """Finding 10: the idempotent-write id came from the run's start time, so a run whose clock read
    earlier than the last run's was taken for a retry and silently skipped."""
    catalogue, cfg = catalogue_config(tmp_path, engine, n=6)
    now = datetime.now(timezone.utc)
    pipeline.run(spark, cfg, now=now)
    listings = read_jsonl(catalogue.listings_path)
    listings[0]["description"] = "Now with a new description"
    write_jsonl(catalogue.listings_path, listings)
    writer = open_writer(spark, cfg)
    before = writer.version(TEXT_TABLE)
    second = pipeline.run(spark, cfg, now=now - timedelta(hours=1))  # another driver, its clock an hour behind
    assert second.stats["texts"] == 1
    assert writer.version(TEXT_TABLE) == before + 1
    texts = read_delta(f"{cfg.output.location}/{TEXT_TABLE.name}").to_pandas().set_index("listing_id")
    assert texts.loc[listings[0]["listing_id"], "text"].endswith("Now with a new description")


def test_the_same_work_retried_is_committed_once(spark, engine, tmp_path):
    writer = open_writer(spark, make_config(tmp_path, engine=engine))
    staged = stage_text_rows(spark, tmp_path / "work", "model-a", ["L1", "L2"])
    commit = Commit({"depop_embed.model_id": "model-a"}, "model-a")
    first = writer.merge(TEXT_TABLE, staged, None, commit)
    assert writer.merge(TEXT_TABLE, staged, None, commit) == first, "the retry is recognised by its transaction id"
    assert read_delta(f"{tmp_path}/tables/{TEXT_TABLE.name}").num_rows == 2
