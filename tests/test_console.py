"""The console: ue_dist's own lines once, Ray's chatter in a log file (``-v`` shows it)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import fit_classwise, make_source
from ue_dist.runtime import console

BIN = Path(sys.executable).parent


def test_router_shows_marked_lines_once_and_logs_the_rest(tmp_path, monkeypatch, capsys):
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    monkeypatch.setattr(console, "_state", {"log_path": str(tmp_path / "x.log"), "file": None})
    saved = list(dispatcher.handlers)
    try:
        console.hush()
        names = [name for name, _ in dispatcher.handlers]
        assert "ue_dist_console" in names and "ray_print_logs" not in names
        batch = {"pid": 7, "actor_name": "RayTrainWorker", "is_err": False,
                 "lines": ["[ue-dist] em step 25/200 loss 1.5", "[ue-dist] em step 25/200 loss 1.5",
                           "Checkpoint successfully created at: ...",
                           "Failed to query Ray Train Controller actor state."]}
        dispatcher.emit(batch)
        err = capsys.readouterr().err
        assert err == "[ue-dist] em step 25/200 loss 1.5\n"
        logged = (tmp_path / "x.log").read_text()
        assert "Checkpoint successfully created" in logged and "Failed to query" in logged
        assert "em step" not in logged
    finally:
        dispatcher.handlers = saved
        if console._state["file"] is not None:
            console._state["file"].close()


@pytest.mark.system
def test_protect_console_has_no_ray_internals(tmp_path, two_nodes):
    src, state = str(tmp_path / "src"), str(tmp_path / "state.pt")
    make_source(src, n_shards=2, per_shard=12)
    fit_classwise(state)
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               UE_DIST_LOG_DIR=str(tmp_path / "logs"))
    env.pop("RAY_ADDRESS", None)

    def run(*extra, **more_env):
        return subprocess.run([str(BIN / "ue-dist"), "protect", "--method", "classwise",
                               "--state", state, src, str(tmp_path / f"dst{len(extra)}"), *extra],
                              env=dict(env, **more_env), capture_output=True, text=True,
                              timeout=300)

    quiet = run()
    assert quiet.returncode == 0, quiet.stderr
    lines = quiet.stderr.strip().splitlines()
    assert all(line.startswith(("[protect]", "[ue-dist]")) for line in lines), lines
    assert len(lines) == len(set(lines)) and len(lines) <= 6, lines
    assert lines[-1].startswith("[ue-dist] Ray's own log lines: ")
    log = Path(lines[-1].split(": ", 1)[1].split(" (-v", 1)[0])
    assert log.parent == tmp_path / "logs" and "Started a local Ray instance" in log.read_text()
    # -v leaves Ray's own lines on the terminal; this run joins the session's cluster (a second
    # local Ray start would cost more than the check)
    verbose = run("-v", RAY_ADDRESS=two_nodes["gcs"])
    assert verbose.returncode == 0, verbose.stderr
    assert "Connecting to existing Ray cluster at address" in verbose.stderr


class _Terminal:
    """A stderr that says it is a terminal and keeps what was written."""

    def __init__(self) -> None:
        self.text = ""

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.text += text
        return len(text)

    def flush(self) -> None:
        pass


def test_router_redraws_worker_progress_lines_on_a_terminal(tmp_path, monkeypatch):
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    from ue_dist.core.progress import ProgressLine

    monkeypatch.setattr(console, "_state", {"log_path": str(tmp_path / "x.log"), "file": None})
    lines = []
    bar = ProgressLine("[ue-dist] victim epochs", 4, lines.append, lines=4)
    for epoch in range(1, 5):
        bar.update(epoch, f"loss {1 / epoch:.2f}")
    terminal = _Terminal()
    saved = list(dispatcher.handlers)
    try:
        console.hush()
        monkeypatch.setattr(sys, "stderr", terminal)
        dispatcher.emit({"pid": 7, "lines": lines[:2]})
        dispatcher.emit({"pid": 8, "lines": ["[ue-dist] fit em: state written"]})
        dispatcher.emit({"pid": 7, "lines": lines[2:]})
    finally:
        dispatcher.handlers = saved
        if console._state["file"] is not None:
            console._state["file"].close()
    # unfinished progress lines replace each other in place; any other line (and the last
    # progress line, 4/4) starts after a newline and ends with one
    assert terminal.text == ("\r" + lines[0] + "\x1b[K" + "\r" + lines[1] + "\x1b[K"
                             + "\n[ue-dist] fit em: state written\n"
                             + "\r" + lines[2] + "\x1b[K" + "\n" + lines[3] + "\n")


def test_progress_line_of_a_resumed_stage_counts_only_new_work():
    from ue_dist.core.context import LocalContext

    lines = []
    bar = LocalContext(log=lines.append).progress("[em] source-model steps", 200)
    bar.start(100)  # resumed half-way: the first tenths are not printed again
    for step in range(101, 201):
        bar.update(step, "loss 0.1")
    assert [line.split("] ", 2)[2].split(" ")[0] for line in lines] == \
        ["120/200", "140/200", "160/200", "180/200", "200/200"]  # a line per tenth of the total
    assert "ETA" in lines[0] and lines[-1].endswith("elapsed")


def test_progress_line_prints_tenths_with_rate_and_eta():
    from ue_dist.runtime.console import ProgressLine

    lines = []
    line = ProgressLine("[protect] shards", 60, lines.append)  # not a terminal: throttled lines
    for done in range(1, 61):
        line.update(done, f"{done * 10} images")
    assert len(lines) == 10  # one per tenth, the last included, not one per shard
    assert lines[0].startswith("[protect] shards [##..................] 6/60 · 60 images · ETA ")
    assert lines[-1].startswith("[protect] shards [####################] 60/60 · 600 images · ")
    assert lines[-1].endswith("elapsed")
    line.note("[protect] SKIPPED bad shard x.tar: truncated")
    assert lines[-1] == "[protect] SKIPPED bad shard x.tar: truncated"
