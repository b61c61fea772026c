# The README's two commands: `make demo` and `make test`. Each creates (or reuses) .venv first.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test install clean

demo: $(VENV)/.installed
	$(PY) jobs/embed_listings.py --config conf/local.yaml

test: $(VENV)/.installed
	$(PY) -m pytest

install: $(VENV)/.installed

# pyproject pins torch/torchvision to the builds that install from this machine's disk (see README).
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -e '.[test]'
	touch $@

clean:
	rm -rf $(VENV) .depop_embed .pytest_cache build *.egg-info
