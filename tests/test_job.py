"""The job's entry point as MLOps runs it: a real process, `python jobs/...` and `spark-submit jobs/...`, on both engines."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from deltalake import DeltaTable

from depop_embed.sample_catalogue import write_catalogue
from depop_embed.session import DEFAULT_IVY, delta_package
from depop_embed.tables import TABLES

from conftest import ROOT, TINY_MODEL, TRACKING

JOB = str(ROOT / "jobs" / "embed_listings.py")


def run_job(launcher: list[str], *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYSPARK")}
    # As in an activated venv: spark-submit finds Spark through the `python3` on PATH.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(
        [*launcher, JOB, "--config", str(ROOT / "conf" / "local.yaml"), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )


def test_bad_overrides_fail_at_once_naming_the_key():
    result = run_job([sys.executable], "--set", "model.colour=red", timeout=60)
    assert result.returncode == 2
    assert "model.colour: unknown key" in result.stderr
    result = run_job([sys.executable], "--set", "encode.image_batch_size=many", timeout=60)
    assert result.returncode == 2 and "encode.image_batch_size: expected int" in result.stderr


def test_spark_submit_runs_the_job_end_to_end(engine, tmp_path: Path):
    catalogue = write_catalogue(tmp_path / "src", n_listings=6, seed=11)
    spark_submit = [str(Path(sys.executable).parent / "spark-submit"), "--master", "local[1]"]
    if engine == "spark":  # `--packages` alone, `engine: auto`: the job writes with the connector it was given
        spark_submit += ["--packages", delta_package(), "--conf", f"spark.jars.ivy={DEFAULT_IVY}"]
        choice = []
    else:
        choice = ["--set", "output.engine=delta-rs"]
    result = run_job(
        spark_submit,
        *choice,
        "--set", f"listings.path={catalogue.listings_path}",
        "--set", f"images.path={catalogue.images_path}",
        "--set", f"output.location={tmp_path / 'tables'}",
        "--set", "model.name=depop-tiny-clip",
        "--set", f"model.config_path={TINY_MODEL}",
        *[arg for override in TRACKING for arg in ("--set", override)],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # spark-submit's master wins over conf's local[*]; spark-submit sends the driver's logs to stdout.
    assert "Spark master local[1]" in result.stdout + result.stderr
    summary = result.stdout
    assert f"{engine} engine" in summary
    assert f"listing_image_embeddings: upsert {catalogue.n_photos} (0 errors)" in summary
    assert f"listing_text_embeddings: upsert {catalogue.n_listings} (0 errors)" in summary
    assert "encoded" in summary and "/s)" in summary
    for spec in TABLES:
        assert DeltaTable(str(tmp_path / "tables" / spec.name)).version() == 1
