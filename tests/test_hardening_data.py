"""Hardening of the data layer: hostile or malformed input is refused with one clear line that
names the file / shard / sample / option, and nothing runs, nothing is half-written."""
from __future__ import annotations

import builtins
import hashlib
import io
import os
import pickle
import tarfile

import numpy as np
import pytest

from ue_dist.cli import main as cli
from ue_dist.data.converters import ConvertError, convert_cifar


def _tar(path, members, mode="w"):
    with tarfile.open(path, mode) as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def _shard_digests(folder):
    return {p: hashlib.sha256(open(os.path.join(folder, p), "rb").read()).hexdigest()
            for p in sorted(os.listdir(folder)) if p.endswith(".tar")}


# 1. CIFAR batches are unpickled by a restricted unpickler ---------------------------------------
class _OpensMarker:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):  # unpickling calls open(path, "w"): creates the marker file
        return (builtins.open, (self.path, "w"))


class _RunsShell:
    def __reduce__(self):
        return (os.system, ("true",))


def _cifar_batch(rng, n):
    return {b"batch_label": b"training batch 1 of 5",
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"labels": [int(v) for v in rng.integers(0, 10, n)],
            b"filenames": [f"img_{i}.png".encode() for i in range(n)]}


def test_crafted_cifar_archive_runs_nothing(tmp_path, capsys):
    marker = tmp_path / "MARKER"
    good = pickle.dumps(_cifar_batch(np.random.default_rng(0), 3))
    archive = tmp_path / "cifar-10-python.tar.gz"
    _tar(archive, [("cifar-10-batches-py/data_batch_1", pickle.dumps(_OpensMarker(str(marker)))),
                   ("cifar-10-batches-py/test_batch", good)], mode="w:gz")
    out = tmp_path / "out"
    assert cli(["convert", "cifar10", str(archive), str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert not marker.exists()
    assert "\n" not in err and err.startswith("ue-dist convert: error: cifar10: ")
    assert "cifar-10-batches-py/data_batch_1" in err and str(archive) in err
    assert "refusing to unpickle" in err and "open" in err
    assert not out.exists() or not [f for _, _, fs in os.walk(out) for f in fs]
    # os.system payload (protocol 2 and default): refused and named, nothing runs
    for proto in (2, pickle.DEFAULT_PROTOCOL):
        _tar(archive, [("cifar-10-batches-py/data_batch_1", pickle.dumps(_RunsShell(), protocol=proto)),
                       ("cifar-10-batches-py/test_batch", good)], mode="w:gz")
        with pytest.raises(ConvertError, match=r"data_batch_1 in .* refers to (posix|nt)\.system, "
                                               r"which a CIFAR batch never holds"):
            convert_cifar(str(archive), str(out))


def test_legit_cifar_archive_converts_with_every_protocol(tmp_path):
    rng = np.random.default_rng(1)
    batches = {"data_batch_1": _cifar_batch(rng, 6), "data_batch_2": _cifar_batch(rng, 4),
               "test_batch": _cifar_batch(rng, 5)}
    batches["data_batch_2"][b"labels"] = list(rng.integers(0, 10, 4))  # numpy int scalars
    digests = []
    for variant in ("p2", "default", "p5", "numpy1"):
        proto = {"p2": 2, "default": pickle.DEFAULT_PROTOCOL, "p5": 5, "numpy1": 2}[variant]
        members = []
        for name, batch in batches.items():
            blob = pickle.dumps(batch, protocol=proto)
            if variant == "numpy1":  # what CIFAR's own archive (numpy 1.x) names
                assert b"numpy._core.multiarray" in blob
                blob = blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            members.append((f"cifar-10-batches-py/{name}", blob))
        archive = tmp_path / f"{variant}.tar.gz"
        _tar(archive, members, mode="w:gz")
        out = tmp_path / f"out-{variant}"
        result = convert_cifar(str(archive), str(out))
        assert result["train"]["samples"] == 10 and result["test"]["samples"] == 5
        digests.append((_shard_digests(out / "train"), _shard_digests(out / "test")))
    assert all(d == digests[0] for d in digests)  # same samples, same shard bytes
    # and those bytes are the plain-pickle path's: the shards of the very same arrays
    from ue_dist.data.converters import write_splits
    x = np.concatenate([batches[n][b"data"] for n in ("data_batch_1", "data_batch_2")])
    y = np.concatenate([np.asarray(batches[n][b"labels"]) for n in ("data_batch_1", "data_batch_2")])
    xt, yt = batches["test_batch"][b"data"], np.asarray(batches["test_batch"][b"labels"])
    hwc = lambda a: a.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # noqa: E731
    write_splits(str(tmp_path / "direct"), {"train": (hwc(x), y), "test": (hwc(xt), yt)},
                 "cifar10", num_classes=10)
    assert digests[0] == (_shard_digests(tmp_path / "direct" / "train"),
                          _shard_digests(tmp_path / "direct" / "test"))


@pytest.mark.parametrize("batch,pattern", [
    ([1, 2, 3], r"data_batch_1 in .* not a CIFAR pickle batch \(holds a list"),
    ({b"data": np.zeros((2, 3072), np.uint8)}, r"data_batch_1 in .*\(no labels entry\)"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1]}, r"data_batch_1 .* 1 label\(s\) for 2"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 10]}, r"data_batch_1 .* outside 0\.\.9"),
    ({b"data": np.full((2, 3072), 300), b"labels": [1, 2]}, r"data_batch_1 .* outside 0\.\.255"),
])
def test_malformed_cifar_batches_are_named(tmp_path, batch, pattern):
    good = pickle.dumps(_cifar_batch(np.random.default_rng(0), 2))
    archive = tmp_path / "c.tar.gz"
    _tar(archive, [("cifar-10-batches-py/data_batch_1", pickle.dumps(batch)),
                   ("cifar-10-batches-py/test_batch", good)], mode="w:gz")
    with pytest.raises(ConvertError, match=pattern) as info:
        convert_cifar(str(archive), str(tmp_path / "out"))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()
