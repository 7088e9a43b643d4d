# Two commands for a newcomer: `make demo` (main job on the embedded default) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export RAY_AUTH_MODE ?= disabled

# Optional extra wheel index for the CPU-only torch build, e.g.
#   make demo TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# On Linux, PyPI's torch wheel pulls about 2.5 GB of CUDA libraries; on that index the same pinned
# version (torch==2.13.0 matches 2.13.0+cpu) comes without them. Empty: pip's own configuration decides.
TORCH_INDEX_URL ?=
PIP_INSTALL = $(PY) -m pip install --disable-pip-version-check -c constraints.txt \
	$(if $(TORCH_INDEX_URL),--extra-index-url $(TORCH_INDEX_URL))

.PHONY: demo test test-slow bench venv venv-test clean

venv: $(VENV)/.installed-run
venv-test: $(VENV)/.installed-test

# Stamps: a second `make` does not reinstall unless pyproject.toml or constraints.txt changed.
# No -q: pip's progress is the only sign of life during a multi-minute first install.
$(VENV)/.installed-run: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed-run
	$(PIP_INSTALL) -e ".[test]"
	touch $@

demo: venv
	$(VENV)/bin/ue-dist demo --out out/demo

# two pytest-xdist workers: most of the suite's time is Ray starting and waiting, not arithmetic
test: venv-test
	$(PY) -m pytest -q -n 2

test-slow: venv-test
	$(PY) -m pytest -q -m slow

bench: venv
	$(PY) -m ue_dist.bench

clean:
	rm -rf out runs
