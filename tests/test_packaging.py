"""Installing the wheel on the Databricks ML runtime the bundle targets changes none of the runtime's own
packages: Spark, Delta, torch, torchvision, MLflow, pandas and pyarrow stay the runtime's.

pip resolves the built wheel under the runtime's preinstalled versions as constraints, for the
runtime's Python, against metadata-only wheels of every distribution involved (captured from PyPI by
tests/assets/runtime_universe.py), with no index: nothing is downloaded and no network is used.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import yaml

from conftest import ROOT

ASSETS = ROOT / "tests" / "assets"
CONSTRAINTS = ASSETS / "dbr-18-lts-ml-gpu-constraints.txt"
UNIVERSE = ASSETS / "dbr-18-lts-ml-gpu-universe.json"
# What the wheel adds to the runtime: itself, open_clip and faiss, and open_clip's timm and ftfy.
ADDED = {"depop-embed", "open-clip-torch", "faiss-cpu", "timm", "ftfy"}
# The runtime's own, whether or not its published list names them (pyspark it leaves out).
NEVER = {"pyspark", "delta-spark", "mlflow"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def runtime_versions() -> dict[str, str]:
    lines = [line.split("==") for line in CONSTRAINTS.read_text().splitlines() if line and not line.startswith("#")]
    return {canonical(name): version.strip() for name, version in lines}


def metadata_only_wheel(folder: Path, dist: dict) -> None:
    """A wheel holding only the distribution's metadata: enough for pip to resolve, nothing to run."""
    stem = f"{re.sub(r'[-.]+', '_', dist['name'])}-{dist['version']}"
    metadata = [f"Metadata-Version: 2.1", f"Name: {dist['name']}", f"Version: {dist['version']}"]
    if dist["requires_python"]:
        metadata.append(f"Requires-Python: {dist['requires_python']}")
    metadata += [f"Requires-Dist: {requirement}" for requirement in dist["requires_dist"]]
    with zipfile.ZipFile(folder / f"{stem}-py3-none-any.whl", "w") as whl:
        whl.writestr(f"{stem}.dist-info/METADATA", "\n".join(metadata) + "\n")
        whl.writestr(f"{stem}.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        whl.writestr(f"{stem}.dist-info/RECORD", "")


def test_the_wheel_installs_on_the_runtime_without_changing_its_packages(built_wheel, tmp_path):
    universe = json.loads(UNIVERSE.read_text())
    stubs = tmp_path / "index"
    stubs.mkdir()
    for dist in universe["distributions"]:
        metadata_only_wheel(stubs, dist)
    report = tmp_path / "report.json"
    resolved = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-index", "--find-links", str(stubs),
         "--report", str(report), "--python-version", universe["python"], "--only-binary=:all:",
         "--target", str(tmp_path / "target"), "-c", str(CONSTRAINTS), str(built_wheel)],
        capture_output=True, text=True, timeout=300,
    )
    assert resolved.returncode == 0, (
        "pip cannot install the wheel on the runtime without changing its packages (or its requirements changed: "
        "rerun tests/assets/runtime_universe.py):\n" + resolved.stderr[-3000:]
    )
    installed = {canonical(i["metadata"]["name"]): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}
    runtime = runtime_versions()
    assert {n: (v, runtime[n]) for n, v in installed.items() if n in runtime and runtime[n] != v} == {}
    # Besides what it adds, only torch's CUDA wheels, which the runtime's image holds and its list leaves out.
    new = {n for n in installed if n not in runtime}
    assert new - ADDED == {n for n in new if n.startswith("nvidia-") or n == "triton"}
    assert not installed.keys() & NEVER, "the runtime's Spark, Delta and MLflow are its own"
    for name in ("torch", "torchvision", "mlflow-skinny", "pandas", "pyarrow"):
        assert installed.get(name, runtime[name]) == runtime[name]


def test_the_bundle_runs_on_the_runtime_the_packaging_test_checks():
    """One runtime: the bundle's clusters, the constraints above and the Python the wheel allows."""
    variables = yaml.safe_load((ROOT / "databricks.yml").read_text())["variables"]
    assert variables["spark_version"]["default"] == "18.x-gpu-ml-scala2.13"
    assert variables["cpu_spark_version"]["default"] == "18.x-cpu-ml-scala2.13"
    assert "18.x-gpu-ml-scala2.13" in CONSTRAINTS.read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'requires-python = ">=3.11,<3.13"' in pyproject  # 3.12 is the runtime's
    dependencies = pyproject[pyproject.index("dependencies = ["):pyproject.index("]", pyproject.index("dependencies = ["))]
    for package in ("pyspark", "delta-spark", "deltalake", '"mlflow'):
        assert package not in dependencies.replace('"mlflow-skinny', ""), package
