# The README's two commands: `make demo` and `make test`. Each creates (or reuses) .venv first.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test install chromium clean

demo: $(VENV)/.installed
	$(PY) jobs/embed_listings.py --config conf/local.yaml

test: $(VENV)/.installed chromium
	$(PY) -m pytest

install: $(VENV)/.installed

# The `local` extra pins the runtime a machine without Databricks needs: Spark, Delta, torch/torchvision
# (the builds that install from this machine's disk, see README) and MLflow. Delta's Spark jars are
# fetched by Spark itself, once, at the first session start (depop_embed/session.py).
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -e '.[local,test]'
	touch $@

# The report test renders the evaluation report in headless Chromium: Debian's package.
chromium:
	@command -v chromium >/dev/null || { \
	  sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); export DEBIAN_FRONTEND=noninteractive; \
	  $$sudo apt-get install -y --no-install-recommends chromium \
	  || { $$sudo apt-get update && $$sudo apt-get install -y --no-install-recommends chromium; }; }

clean:
	rm -rf $(VENV) .depop_embed .pytest_cache build *.egg-info
