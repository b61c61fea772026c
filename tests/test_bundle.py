"""The Databricks Asset Bundle, checked without a workspace.

`databricks.yml` and its `resources/*.yml` are resolved for each target as `databricks bundle validate`
resolves them: a variable takes its `--var` value, else the target's, else its default (none at all is
an error); `${var.*}`, `${bundle.*}` and `${workspace.current_user.*}` are substituted; the target's
`run_as` goes onto every job; a relative path counts from the file that holds it. The CLI's
development-mode renames come on top and are not modelled. Then:
- every job loads into the typed job model of the `databricks-bundles` package, losing nothing;
- every task's entry file exists, its parameters (with the job parameters' defaults, or the values a
  `bundle run --params` gives) parse with that job's own argparse parser, and the config loads;
- the wheel that the bundle's artifact builds holds the package and conf/, and installed alone in a
  clean venv it runs a job's --help and loads `--config databricks` from a folder without conf/.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml
from databricks.bundles.jobs import Job

from depop_embed import config

from conftest import ROOT

TARGETS = ("dev", "prod")
JOBS = ("embed_listings", "backfill_model", "register_model", "set_current_model", "evaluate_model", "finetune_model")
USER = {"userName": "ana.lopez@depop.example", "short_name": "ana_lopez"}
SERVICE_PRINCIPAL = "6f1c2e0a-0b5e-4f8e-9d4a-2c7b1e9f3a10"
TEAM_EMAIL = "mlops-alerts@depop.example"
# What each target's deploy passes with --var: prod has no default service principal or address.
DEPLOY_VARS = {"dev": {}, "prod": {"service_principal": SERVICE_PRINCIPAL, "alert_email": TEAM_EMAIL}}
# The independent expectation: where each target's tables, staging volume and model live.
SCHEMA = {"dev": "dev_ana_lopez_depop_embed", "prod": "depop_embed"}
ALERTS = {"dev": USER["userName"], "prod": TEAM_EMAIL}

_BUNDLE_REF = re.compile(r"\$\{([\w.-]+)\}")
_JOB_PARAMETER = re.compile(r"\{\{job\.parameters\.([\w-]+)\}\}")
_TARGET_KEYS = {"mode", "default", "variables", "workspace", "run_as"}  # handled, or (workspace) not in jobs


def resolve_bundle(target: str, cli_vars: dict[str, str]) -> dict:
    """The bundle's jobs for one target, every `${...}` substituted; the target's mode and run_as."""
    root = yaml.safe_load((ROOT / "databricks.yml").read_text())
    settings = root["targets"][target]
    assert set(settings) <= _TARGET_KEYS, f"target {target} sets {set(settings) - _TARGET_KEYS}: resolve them here too"
    declared = root["variables"]
    overrides = {**settings.get("variables", {}), **cli_vars}
    assert set(overrides) <= set(declared), f"undeclared variables {set(overrides) - set(declared)}"
    values = {}
    for name, spec in declared.items():
        if name not in overrides and "default" not in spec:
            raise LookupError(f"no value assigned to required variable {name}")
        values[name] = overrides.get(name, spec.get("default"))
    context = {"bundle.name": root["bundle"]["name"], "bundle.target": target}
    context.update({f"workspace.current_user.{key}": value for key, value in USER.items()})

    def lookup(ref: str):
        return substitute(values[ref.removeprefix("var.")]) if ref.startswith("var.") else context[ref]

    def substitute(value):
        if isinstance(value, dict):
            return {key: substitute(item) for key, item in value.items()}
        if isinstance(value, list):
            return [substitute(item) for item in value]
        if not isinstance(value, str):
            return value
        if whole := _BUNDLE_REF.fullmatch(value):  # a lone reference keeps the variable's type
            return lookup(whole[1])
        return _BUNDLE_REF.sub(lambda match: str(lookup(match[1])), value)

    jobs = {}
    for pattern in root["include"]:
        for path in sorted(ROOT.glob(pattern)):
            for key, job in yaml.safe_load(path.read_text())["resources"]["jobs"].items():
                assert key not in jobs, f"job {key} is defined twice"
                jobs[key] = _paths_from_root(job, path.parent)
    resolved = substitute({"jobs": jobs, "run_as": settings.get("run_as"), "artifacts": root["artifacts"], "sync": root["sync"]})
    if resolved["run_as"]:
        for job in resolved["jobs"].values():
            job["run_as"] = resolved["run_as"]
    return {**resolved, "mode": settings["mode"]}


def _paths_from_root(job: dict, folder: Path) -> dict:
    """Task file and library paths relative to the bundle root, as the CLI reads them from `folder`."""
    job = copy.deepcopy(job)

    def rebase(path: str) -> str:
        return str((folder / path).resolve().relative_to(ROOT))

    for task in job["tasks"]:
        task["spark_python_task"]["python_file"] = rebase(task["spark_python_task"]["python_file"])
        for library in task.get("libraries", []):
            library["whl"] = rebase(library["whl"])
    return job


def task_argv(job: dict, task: dict, **run_params: str) -> list[str]:
    """A task's command line in a run: job parameter references filled from `run_params` or defaults."""
    defaults = {p["name"]: p["default"] for p in job.get("parameters", [])}
    unknown = set(run_params) - set(defaults)
    assert not unknown, f"{job['name']} has no job parameters {unknown}"
    values = {**defaults, **run_params}
    return [_JOB_PARAMETER.sub(lambda m: values[m[1]], arg) for arg in task["spark_python_task"]["parameters"]]


def parse_task(job: dict, task_key: str | None = None, **run_params: str):
    """Parse a task's parameters (the job's only task, or `task_key`'s) with its entry file's own parser;
    load the config they name."""
    if task_key is None:
        (task,) = job["tasks"]
    else:
        (task,) = [t for t in job["tasks"] if t["task_key"] == task_key]
    entry = ROOT / task["spark_python_task"]["python_file"]
    assert entry.is_file(), f"{job['name']}: no entry file {entry}"
    spec = importlib.util.spec_from_file_location(f"bundle_job_{entry.stem}", entry)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = module.build_parser().parse_args(task_argv(job, task, **run_params))
    return args, config.load(args.config, args.overrides)


@pytest.fixture(scope="module", params=TARGETS)
def bundle(request) -> tuple[str, dict]:
    return request.param, resolve_bundle(request.param, DEPLOY_VARS[request.param])


def test_every_job_loads_into_the_typed_bundle_models(bundle):
    target, resolved = bundle
    assert set(resolved["jobs"]) == set(JOBS)
    for key, spec in resolved["jobs"].items():
        assert "${" not in json.dumps(spec), f"{key}: unresolved reference"
        job = Job.from_dict(copy.deepcopy(spec))
        assert job.as_dict() == spec, f"{key}: the typed model dropped or changed a field"
        assert job.email_notifications.on_failure == [ALERTS[target]]
        assert job.timeout_seconds > 0
        for task in job.tasks:
            assert task.max_retries >= 1 and 0 < task.timeout_seconds <= job.timeout_seconds
            assert [lib.whl for lib in task.libraries] == ["dist/*.whl"]


def test_a_misnamed_field_does_not_load():
    spec = resolve_bundle("dev", {})["jobs"]["embed_listings"]
    spec["tasks"][0]["max_retry"] = 3
    with pytest.raises(ValueError, match="max_retry"):
        Job.from_dict(spec)
    spec = resolve_bundle("dev", {})["jobs"]["embed_listings"]
    spec["schedule"]["pause_status"] = "OFF"
    with pytest.raises(ValueError, match="OFF"):
        Job.from_dict(spec)


def test_targets_dev_is_per_user_and_paused_prod_runs_as_a_service_principal():
    dev, prod = resolve_bundle("dev", {}), resolve_bundle("prod", DEPLOY_VARS["prod"])
    assert dev["mode"] == "development" and prod["mode"] == "production"
    assert dev["jobs"]["embed_listings"]["schedule"]["pause_status"] == "PAUSED"
    assert prod["jobs"]["embed_listings"]["schedule"]["pause_status"] == "UNPAUSED"
    assert all("run_as" not in job for job in dev["jobs"].values())
    assert all(job["run_as"] == {"service_principal_name": SERVICE_PRINCIPAL} for job in prod["jobs"].values())
    for missing in ("service_principal", "alert_email"):
        with pytest.raises(LookupError, match=missing):
            resolve_bundle("prod", {k: v for k, v in DEPLOY_VARS["prod"].items() if k != missing})


def test_the_deploy_uploads_what_the_tasks_run():
    resolved = resolve_bundle("dev", {})
    build = resolved["artifacts"]["depop_embed_wheel"]
    assert build["type"] == "whl" and build["path"] == "."
    assert "--wheel-dir dist" in build["build"]  # where the tasks' `dist/*.whl` libraries look
    for job in resolved["jobs"].values():
        for task in job["tasks"]:
            entry = Path(task["spark_python_task"]["python_file"])
            assert entry.parts[0] not in resolved["sync"]["exclude"]


@pytest.mark.parametrize("key", ["embed_listings", "backfill_model"])
def test_embedding_jobs_run_on_gpus_with_the_configs_arrow_batch(bundle, key):
    target, resolved = bundle
    job = resolved["jobs"][key]
    (cluster,) = job["job_clusters"]
    assert job["tasks"][0]["job_cluster_key"] == cluster["job_cluster_key"]
    spec = cluster["new_cluster"]
    assert "gpu-ml" in spec["spark_version"] and spec["node_type_id"] == "g5.xlarge"
    assert spec["num_workers"] == {"embed_listings": 2, "backfill_model": 8}[key]
    args, cfg = parse_task(job, "embed" if key == "embed_listings" else None)
    conf = spec["spark_conf"]
    assert conf["spark.task.resource.gpu.amount"] == "1" and conf["spark.executor.resource.gpu.amount"] == "1"
    # One task per GPU, owning the node's cores (a g5.xlarge has 4 vCPUs): its decode threads follow them.
    assert conf["spark.task.cpus"] == "4"
    assert cfg.encode.decode_threads == 0 and cfg.encode.torch_threads == 0
    assert conf["spark.sql.execution.arrow.maxRecordsPerBatch"] == str(cfg.encode.arrow_batch_size) == "2048"
    assert cfg.model.device == "auto"  # cuda where Spark gave the task a GPU


def test_daily_job_embeds_incrementally_with_the_champion(bundle):
    target, resolved = bundle
    job = resolved["jobs"]["embed_listings"]
    assert job["schedule"]["quartz_cron_expression"] == "0 0 3 * * ?" and job["max_concurrent_runs"] == 1
    args, cfg = parse_task(job, "embed")
    schema = SCHEMA[target]
    assert args.config == "databricks" and not cfg.incremental.full_refresh
    assert cfg.output.location == f"main.{schema}" and cfg.output.is_catalog
    assert cfg.output.engine == "spark"
    assert cfg.output.staging_path == f"/Volumes/main/{schema}/staging"
    assert (cfg.listings.path, cfg.listings.format) == ("main.marketplace.listings", "delta")
    assert (cfg.images.path, cfg.images.format) == ("main.marketplace.listing_images", "delta")
    assert cfg.images.uri_root == "/Volumes/main/marketplace/listing_photos"
    assert cfg.model.pretrained is None and cfg.model.registered == f"models:/main.{schema}.depop_clip@champion"
    assert (cfg.tracking.tracking_uri, cfg.tracking.registry_uri) == ("databricks", "databricks-uc")
    experiment = {"dev": "/Users/ana.lopez@depop.example/depop-embed", "prod": "/Shared/depop-embed"}[target]
    assert cfg.tracking.experiment == experiment


def test_backfill_embeds_everything_with_the_chosen_model(bundle):
    target, resolved = bundle
    job = resolved["jobs"]["backfill_model"]
    assert "schedule" not in job
    args, cfg = parse_task(job)
    schema = SCHEMA[target]
    assert cfg.incremental.full_refresh and cfg.output.location == f"main.{schema}"
    assert cfg.model.registered == f"models:/main.{schema}.depop_clip@challenger"
    args, cfg = parse_task(job, model=f"models:/main.{schema}.depop_clip/7")
    assert cfg.model.registered == f"models:/main.{schema}.depop_clip/7"
    with pytest.raises(config.ConfigError, match="model.registered"):
        parse_task(job, model="ViT-B-32")
    daily_args, _ = parse_task(resolved["jobs"]["embed_listings"], "embed")
    assert _without_model(args) == _without_model(daily_args)  # same tables, sources and tracking


def _without_model(args) -> list[str]:
    return [item for item in args.overrides if not item.startswith(("model.", "incremental.full_refresh"))]


def test_register_model_registers_a_pretrained_tag_or_a_checkpoint(bundle):
    target, resolved = bundle
    job = resolved["jobs"]["register_model"]
    args, cfg = parse_task(job)
    assert args.name == f"main.{SCHEMA[target]}.depop_clip" and args.alias == "challenger"
    assert (cfg.model.name, cfg.model.pretrained, cfg.model.checkpoint) == ("ViT-B-32", "laion2b_s34b_b79k", None)
    assert cfg.tracking.registry_uri == "databricks-uc"
    checkpoint = "/Volumes/main/depop_embed/models/ft.safetensors"
    args, cfg = parse_task(job, pretrained="null", checkpoint=checkpoint, alias="champion")
    assert (cfg.model.pretrained, cfg.model.checkpoint, args.alias) == (None, checkpoint, "champion")
    with pytest.raises(config.ConfigError, match="set exactly one"):
        parse_task(job, checkpoint=checkpoint)


def test_the_daily_job_then_refreshes_neighbours_and_the_serving_export(bundle):
    target, resolved = bundle
    job = resolved["jobs"]["embed_listings"]
    assert [t["task_key"] for t in job["tasks"]] == ["embed", "neighbours", "export_serving"]
    _, daily = parse_task(job, "embed")
    schema = SCHEMA[target]
    for key, entry in (("neighbours", "jobs/build_neighbours.py"), ("export_serving", "jobs/export_serving.py")):
        (task,) = [t for t in job["tasks"] if t["task_key"] == key]
        assert task["depends_on"] == [{"task_key": "embed"}] and task["spark_python_task"]["python_file"] == entry
        args, cfg = parse_task(job, key)
        assert args.model_id is None  # the current model
        assert (cfg.output, cfg.tracking) == (daily.output, daily.tracking)
    _, cfg = parse_task(job, "export_serving")
    assert cfg.serving.index_path == f"/Volumes/main/{schema}/serving"


def test_evaluate_model_compares_a_model_with_the_current_one(bundle):
    target, resolved = bundle
    job = resolved["jobs"]["evaluate_model"]
    schema = SCHEMA[target]
    args, cfg = parse_task(job)
    assert (args.model_id, args.baseline) == ("", "")  # empty: the current model and its predecessor
    model_id = f"registered/main.{schema}.depop_clip/8"
    args, cfg = parse_task(job, model_id=model_id, baseline=f"registered/main.{schema}.depop_clip/7")
    assert args.model_id == model_id and args.baseline.endswith("/7")
    _, daily = parse_task(resolved["jobs"]["embed_listings"], "embed")
    assert (cfg.output, cfg.listings, cfg.images, cfg.tracking) == (daily.output, daily.listings, daily.images, daily.tracking)
    assert cfg.evaluation.report_dir == f"/Volumes/main/{schema}/reports"


def test_set_current_model_switches_the_targets_tables(bundle):
    target, resolved = bundle
    job = resolved["jobs"]["set_current_model"]
    model_id = f"registered/main.{SCHEMA[target]}.depop_clip/7"
    args, cfg = parse_task(job, model_id=model_id)
    assert args.model_id == model_id and cfg.output.location == f"main.{SCHEMA[target]}"


def test_packaged_config_names_load_the_files_under_conf(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no conf/ here: the name resolves in the package
    assert config.load("databricks") == config.load(ROOT / "conf" / "databricks.yaml")
    with pytest.raises(config.ConfigError, match="not a packaged config .*databricks"):
        config.load("databrick")
    with pytest.raises(config.ConfigError, match="cannot read config file"):
        config.load("databricks.yaml")  # with a suffix it is a file, and there is none here


def test_the_wheel_holds_the_package_and_conf_and_runs_from_a_clean_venv(built_wheel, tmp_path):
    wheel = built_wheel
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in (ROOT / "depop_embed").glob("*.py"):
        assert f"depop_embed/{module.name}" in names
    for conf in (ROOT / "conf").glob("*.yaml"):
        assert zipfile.ZipFile(wheel).read(f"depop_embed/conf/{conf.name}") == conf.read_bytes()

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = venv / "bin" / "python"
    subprocess.run([*pip, "--python", python, "install", "--no-deps", wheel], check=True)
    # Its dependencies (pyspark, torch, ...) come from this venv, as a Databricks runtime provides them.
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    bare = tmp_path / "cluster"
    bare.mkdir()
    shutil.copytree(ROOT / "jobs", bare / "jobs")
    run = subprocess.run(
        [python, "jobs/embed_listings.py", "--help"], cwd=bare, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "--config" in run.stdout and "--full-refresh" in run.stdout
    probe = "import depop_embed, depop_embed.config as c; print(depop_embed.__file__); print(c.load('databricks').output.location)"
    run = subprocess.run([python, "-c", probe], cwd=bare, capture_output=True, text=True, timeout=60, check=True)
    installed_at, location = run.stdout.split()
    assert Path(installed_at).is_relative_to(site) and location == "main.depop_embed"
