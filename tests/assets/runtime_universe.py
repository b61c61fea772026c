"""Capture, from PyPI, the package metadata that tests/test_packaging.py resolves the wheel against offline.

    python tests/assets/runtime_universe.py      # after changing the wheel's dependencies or the runtime list

pip resolves the project's wheel under the runtime's constraints (tests/assets/dbr-18-lts-ml-gpu-constraints.txt)
for the runtime's Python, as a cluster would install it, downloading metadata only; the name, version,
Requires-Python and Requires-Dist of every distribution it picked are written to
tests/assets/dbr-18-lts-ml-gpu-universe.json. The test rebuilds those distributions as metadata-only
wheels and resolves again with no index at all, so it needs no network and fails when the wheel's
requirements stop fitting the runtime.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ASSETS = Path(__file__).resolve().parent
ROOT = ASSETS.parents[1]
CONSTRAINTS = ASSETS / "dbr-18-lts-ml-gpu-constraints.txt"
UNIVERSE = ASSETS / "dbr-18-lts-ml-gpu-universe.json"
RUNTIME_PYTHON = "3.12"
# Ubuntu 24.04 images take manylinux wheels up to glibc 2.39.
PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in range(17, 40)] + ["manylinux2014_x86_64", "linux_x86_64"]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp, str(ROOT)], check=True)
        (wheel,) = Path(tmp).glob("depop_embed-*.whl")
        report = Path(tmp) / "report.json"
        env = {k: v for k, v in os.environ.items() if k != "PIP_FIND_LINKS"}  # PyPI only, not this machine's wheels
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report),
             "--python-version", RUNTIME_PYTHON, *[a for p in PLATFORMS for a in ("--platform", p)], "--only-binary=:all:",
             "--target", str(Path(tmp) / "target"), "-c", str(CONSTRAINTS), str(wheel)],
            check=True, env=env,
        )
        installed = json.loads(report.read_text())["install"]
    distributions = sorted(
        (
            {
                "name": item["metadata"]["name"],
                "version": item["metadata"]["version"],
                "requires_python": item["metadata"].get("requires_python"),
                "requires_dist": item["metadata"].get("requires_dist", []),
            }
            for item in installed
            if item["metadata"]["name"] != "depop-embed"
        ),
        key=lambda d: d["name"].lower(),
    )
    UNIVERSE.write_text(json.dumps({"python": RUNTIME_PYTHON, "distributions": distributions}, indent=1) + "\n")
    print(f"{len(distributions)} distributions -> {UNIVERSE}")


if __name__ == "__main__":
    main()
