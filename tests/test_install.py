"""The install path: ``pyproject.toml`` + ``constraints.txt`` resolve, with pip's resolver itself
(``pip install --dry-run --report``, nothing installed).

- The pins are public versions and sit inside the declared ranges (no network).
- With this machine's pip configuration (what CI has), the pinned torch resolves to the CPU build
  and no CUDA package comes along (fast: torch and torchvision only).
- ``slow``: with no pip configuration at all, against the public index only, the whole project
  (test extra included) resolves on this platform and names torch 2.13.0. The index seen here
  offers no separate metadata files, so pip downloads every wheel it considers (about 2.5 GB of
  CUDA wheels on Linux; 14 min on this loaded 2-core machine); skipped, saying so, where the public
  index cannot be reached. macOS is not checked: ``pip --platform`` still evaluates environment
  markers for this machine, so torch's Linux-only CUDA requirements fail the resolve.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "constraints.txt"
CUDA_PREFIXES = ("nvidia-", "triton", "cuda-")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _requirements(extra: str | None = None) -> list[Requirement]:
    project = _pyproject()["project"]
    reqs = project["dependencies"] + (project["optional-dependencies"][extra] if extra else [])
    return [Requirement(r) for r in reqs]


def _pins() -> dict[str, Version]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            pins[canonicalize_name(req.name)] = Version(spec.version)
    return pins


def _resolve(args: list[str], *, public: bool, tmp_path: Path, timeout: float) -> dict[str, Version]:
    """Names and versions that pip would install into an empty environment."""
    report = tmp_path / "report.json"
    env, opts = (_stock_pip_env(), ["--isolated"]) if public else (dict(os.environ), [])
    cmd = [sys.executable, "-m", "pip", *opts, "install", "--dry-run", "--ignore-installed",
           "--disable-pip-version-check", "--report", str(report), "-c", str(CONSTRAINTS), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"pip resolve failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    items = json.loads(report.read_text())["install"]
    return {canonicalize_name(i["metadata"]["name"]): Version(i["metadata"]["version"]) for i in items}


def _stock_pip_env() -> dict[str, str]:
    """No config file (PIP_CONFIG_FILE=os.devnull skips all of them) and no PIP_* variables: pip's
    built-in default, the public index, as on a stock machine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    return env


def _public_index_unreachable() -> str | None:
    cmd = [sys.executable, "-m", "pip", "--isolated", "--disable-pip-version-check", "index",
           "versions", "pip", "--timeout", "15", "--retries", "1"]
    proc = subprocess.run(cmd, env=_stock_pip_env(), capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        return ("pip's default public index (PyPI) is not reachable from this machine: "
                + (proc.stderr.strip().splitlines() or ["no message"])[-1])
    return None


def _pip_offers_extra_sources() -> bool:
    """Does this machine's pip configuration add wheel sources beyond the default index?"""
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"],
                         capture_output=True, text=True, timeout=60).stdout
    keys = ("find-links", "extra-index-url", "index-url")
    return any(k in out for k in keys) or any(
        os.environ.get(v) for v in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_INDEX_URL"))


def test_pins_are_public_versions_inside_the_declared_ranges():
    pins = _pins()
    for name in ("torch", "torchvision"):
        # A local label (+cpu) exists only on PyTorch's own index: a stock machine cannot resolve it.
        assert pins[name].local is None, f"{name}=={pins[name]} pins a local build"
    declared = {canonicalize_name(r.name): r.specifier for r in _requirements("test")}
    for name in ("torch", "torchvision", "boto3"):
        assert declared[name].contains(pins[name]), f"{name}=={pins[name]} outside {declared[name]}"


def test_ray_range_starts_at_train_v2():
    ray = next(r for r in _requirements() if r.name == "ray")
    # Resume by run name needs Train V2, the default from 2.51; 2.60 is the tested version.
    assert not ray.specifier.contains("2.50.1")
    assert ray.specifier.contains("2.51.0") and ray.specifier.contains("2.60.0")
    assert {"train", "tune", "data", "default"} <= ray.extras


def test_demo_install_leaves_out_the_test_tools():
    runtime = {canonicalize_name(r.name) for r in _requirements()}
    assert not runtime & {"pytest", "hypothesis", "moto", "webdataset"}


def test_this_machines_pip_config_resolves_the_cpu_torch(tmp_path):
    if not _pip_offers_extra_sources():
        pytest.skip("this machine's pip configuration adds no wheel source (find-links or an "
                    "extra index) that could offer a CPU torch build; CI's does")
    got = _resolve(["torch", "torchvision"], public=False, tmp_path=tmp_path, timeout=240)
    pins = _pins()
    assert got["torch"].public == str(pins["torch"]) and got["torch"].local == "cpu", got["torch"]
    assert got["torchvision"] == pins["torchvision"]
    cuda = sorted(n for n in got if n.startswith(CUDA_PREFIXES))
    assert not cuda, f"CUDA packages pulled in: {cuda}"


@pytest.mark.slow
def test_public_index_alone_resolves_the_project(tmp_path):
    reason = _public_index_unreachable()
    if reason:
        pytest.skip(reason)
    # ".[test]" builds the project's metadata too, with build isolation (setuptools from PyPI).
    got = _resolve([".[test]"], public=True, tmp_path=tmp_path, timeout=1800)
    pins = _pins()
    assert got["torch"] == pins["torch"] == Version("2.13.0"), got["torch"]
    assert got["torchvision"] == pins["torchvision"]
    ray = next(r for r in _requirements() if r.name == "ray")
    assert ray.specifier.contains(got["ray"]), got["ray"]
    assert "ue-dist" in got
