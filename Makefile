# Two commands for a newcomer: `make demo` (main job on the embedded default) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export RAY_AUTH_MODE ?= disabled

.PHONY: demo test test-slow bench venv clean

venv: $(VENV)/.installed

# constraints.txt pins the CPU torch wheel: without it pip pulls several GB of CUDA packages.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[test]"
	touch $@

demo: venv
	$(VENV)/bin/ue-dist demo --out out/demo

test: venv
	$(PY) -m pytest -q

test-slow: venv
	$(PY) -m pytest -q -m slow

bench: venv
	$(PY) -m ue_dist.bench

clean:
	rm -rf out runs
