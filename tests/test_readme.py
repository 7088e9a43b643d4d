"""The README's commands: every `ue-dist` line parses with the real parser and names files that
exist; the first-steps walkthrough runs top to bottom (slow: ``pytest -m slow tests/test_readme.py``)."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
BLOCKS = re.findall(r"```bash\n(.*?)```", README, re.S)


def _commands():
    """Each `ue-dist ...` command of the README's bash blocks (continuation lines joined,
    comments dropped), except lines that elide arguments with `...`."""
    out = []
    for block in BLOCKS:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            # a command line of its own, or the entrypoint of `ray job submit ... --`
            m = re.search(r"(?:^|\s--\s+)(?:\.venv/bin/)?(ue-dist\s.*)$", line)
            if m and "..." not in m.group(1):
                out.append(m.group(1))
    return out


COMMANDS = _commands()


def test_the_readme_has_its_walkthrough_and_commands():
    assert "<!-- readme-walkthrough -->" in README and len(COMMANDS) >= 30


@pytest.mark.parametrize("command", COMMANDS)
def test_every_readme_command_parses(command):
    """The parser accepts each documented command as written (no abbreviations, no renamed or
    missing options); the job and sweep specs it names exist."""
    from ue_dist.cli import build_parser

    argv = shlex.split(command)[1:]
    argv = [a for a in argv if a not in ("&&",)]
    build_parser().parse_args(argv)  # argparse exits (SystemExit) on anything unknown
    for arg in argv:
        if re.fullmatch(r"(jobs|cluster|docs)/[\w./-]+", arg):
            assert (REPO / arg).exists(), f"{command}: {arg} does not exist"


def _walkthrough() -> str:
    tail = README.split("<!-- readme-walkthrough -->", 1)[1]
    return re.search(r"```bash\n(.*?)```", tail, re.S).group(1)


@pytest.mark.slow
def test_the_first_steps_walkthrough_runs_top_to_bottom(tmp_path):
    """The block, as written, in a copy of the repository's jobs/ (its relative paths), with
    this venv's ue-dist first on PATH (`source .venv/bin/activate` in the block is skipped:
    the copy has no venv of its own). Each line must exit 0."""
    import shutil
    import time

    shutil.copytree(REPO / "jobs", tmp_path / "jobs")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
               RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    started = time.time()
    for line in _walkthrough().splitlines():
        command = line.split(" #", 1)[0].strip()
        if not command or command.startswith("source "):
            continue
        t = time.time()
        proc = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=3600)
        print(f"{time.time() - t:6.0f} s  {command}")
        assert proc.returncode == 0, f"{command}\n{(proc.stdout + proc.stderr)[-3000:]}"
    print(f"walkthrough: {time.time() - started:.0f} s")
    assert (tmp_path / "runs" / "sweep-digits" / "report" / "pivot.md").exists()


@pytest.mark.slow
def test_the_photo_walkthrough_runs_on_real_photos(tmp_path):
    """The five-command photo block, as written, with HOME = a temporary folder holding
    ~/photos: 24 crops of scikit-learn's two real JPEGs at several sizes in sub-folders (one
    EXIF-rotated). Each line must exit 0; export gives back every photo at its relative path,
    upright, within 8 levels of its original."""
    import io

    import numpy as np
    from PIL import Image, ImageOps

    from ue_dist.data.sources import sample_photos

    photos = [Image.open(io.BytesIO(b)).convert("RGB") for b in sample_photos().values()]
    originals = {}
    for i in range(24):
        src = photos[i % 2]
        w, h = 120 + 37 * i, 90 + 23 * i
        crop = src.crop((i * 3, i * 2, i * 3 + min(w, 600), i * 2 + min(h, 400)))
        rel = f"{'trip' if i % 3 else 'home'}/day {i % 4}/img.{i:02d}.jpg"
        path = tmp_path / "photos" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if i == 5:  # stored sideways, upright by its EXIF orientation
            exif = Image.Exif()
            exif[0x0112] = 6
            crop.transpose(Image.Transpose.ROTATE_90).save(path, quality=92, exif=exif)
        else:
            crop.save(path, quality=92)
        originals[rel] = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
    block = re.search(r"<!-- photo-walkthrough -->\n```bash\n(.*?)```", README, re.S).group(1)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
               RAY_AUTH_MODE="disabled", HOME=str(tmp_path))
    env.pop("RAY_ADDRESS", None)
    for line in block.splitlines():
        command = line.split(" #", 1)[0].strip()
        if command:
            proc = subprocess.run(command, shell=True, cwd=tmp_path, env=env,
                                  capture_output=True, text=True, timeout=3600)
            assert proc.returncode == 0, f"{command}\n{(proc.stdout + proc.stderr)[-3000:]}"
    for rel, original in originals.items():
        out = np.asarray(Image.open(tmp_path / "photos-protected" / (rel[:-4] + ".png")))
        assert out.shape == original.shape, rel
        diff = np.abs(out.astype(int) - original.astype(int))
        assert 0 < diff.max() <= 8, rel
    assert (tmp_path / "photos-protected" / "ue-dist-export.json").exists()
    assert (tmp_path / "preview.png").exists()
