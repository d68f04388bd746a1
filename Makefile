# Two entry points; each creates/updates the virtual environment at .venv first.
#   make demo   - a real federated HFedMoE run on the embedded default (offline, CPU)
#   make test   - the test suite
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.hfedmoe-installed
# torch first, pinned: here it comes from a local CPU wheel; an unpinned torch
# would pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: demo test venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/hfedmoe run

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
