"""Hardening of the data layer: hostile or malformed input is refused with one clear line that
names the file / shard / sample / option, and nothing runs, nothing is half-written."""
from __future__ import annotations

import builtins
import hashlib
import io
import json
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


# 2-6, 8. shards: every refusal names the shard and sample, on one line ------------------------
from PIL import Image  # noqa: E402

from ue_dist.data.dataset import write_samples  # noqa: E402
from ue_dist.data.shards import (Sample, ShardError, decode_image, parse_shard,  # noqa: E402
                                 read_shard, shard_bytes)


def _png(arr=None, mode=None):
    arr = np.zeros((4, 4, 3), np.uint8) if arr is None else arr
    buf = io.BytesIO()
    (Image.fromarray(arr, mode) if mode else Image.fromarray(arr)).save(buf, format="PNG")
    return buf.getvalue()


def _png16_rgb(h=4, w=4, alpha=False):
    """A 48-bit RGB (or 64-bit RGBA) PNG, written by hand: Pillow cannot write one, and opens it
    as plain "RGB"/"RGBA", silently dropping the low byte of every value."""
    import struct
    import zlib
    ch = 4 if alpha else 3
    rows = b"".join(b"\x00" + np.full((w, ch), 40000, ">u2").tobytes() for _ in range(h))

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 6 if alpha else 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


def _shard(path, members):
    _tar(path, members)
    return str(path)


def _refusal(path, pattern):
    with pytest.raises(ShardError, match=pattern) as info:
        read_shard(path)
    message = str(info.value)
    assert os.path.basename(path) in message and "\n" not in message
    return message


@pytest.mark.parametrize("payload,bits", [
    (_png(np.full((4, 4), 40000, np.uint16)), 16),           # I;16 (16-bit grey)
    (_png16_rgb(), 16), (_png16_rgb(alpha=True), 16),         # 48/64-bit RGB(A): opens as RGB(A)
], ids=["grey16", "rgb48", "rgba64"])
def test_16bit_images_are_refused_not_clipped(tmp_path, payload, bits):
    path = _shard(tmp_path / "deep.tar", [("a.png", _png()), ("a.cls", b"0"),
                                          ("b.png", payload), ("b.cls", b"1")])
    msg = _refusal(path, rf"shard .*deep.tar, sample 'b': b.png is a {bits}-bit image")
    assert "convert it to 8-bit first" in msg
    with pytest.raises(ShardError, match="16-bit"):
        decode_image(payload)
    # 8-bit images still decode exactly, grey, RGB, RGBA and palette
    rgb = np.random.default_rng(0).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    assert np.array_equal(decode_image(_png(rgb)), rgb)
    assert decode_image(_png(rgb[..., 0])).shape == (4, 4, 1)
    assert decode_image(_png(np.dstack([rgb, rgb[..., :1]]))).shape == (4, 4, 4)


def test_imagefolder_refuses_16bit_and_float_images(tmp_path):
    from ue_dist.data.converters import convert_imagefolder
    for cls in ("cat", "dog"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((4, 4, 3), i, np.uint8)).save(tmp_path / "imgs" / cls / f"{i}.png")
    (tmp_path / "imgs" / "dog" / "deep.png").write_bytes(_png16_rgb())
    with pytest.raises(ConvertError, match=r"imagefolder: .*deep.png is a 16-bit image"):
        convert_imagefolder(str(tmp_path / "imgs"), str(tmp_path / "out"))
    (tmp_path / "imgs" / "dog" / "deep.png").unlink()
    Image.fromarray(np.full((4, 4), 0.5, np.float32)).save(tmp_path / "imgs" / "dog" / "f.tif")
    with pytest.raises(ConvertError, match=r"imagefolder: .*f.tif is a 32-bit image"):
        convert_imagefolder(str(tmp_path / "imgs"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_duplicate_members_are_refused(tmp_path):
    path = _shard(tmp_path / "dup.tar", [("a.png", _png()), ("a.cls", b"1"),
                                         ("a.png", _png()), ("a.cls", b"2")])
    _refusal(path, r"shard .*dup.tar, sample 'a': duplicate member 'a.png'")
    path = _shard(tmp_path / "dup2.tar", [("a.png", _png()), ("a.cls", b"1"), ("a.CLS", b"2")])
    _refusal(path, r"sample 'a': duplicate member 'a.CLS' \(as 'a.cls' and 'a.CLS'\)")


def test_dotted_keys_are_named(tmp_path):
    path = _shard(tmp_path / "dots.tar", [("a.b.png", _png()), ("a.b.cls", b"1")])
    _refusal(path, r"shard .*dots.tar, sample 'a': sample keys may not contain dots "
                   r"\(member 'a.b.png'")
    # a dotted extension next to a real image stays a WebDataset extra field
    path = _shard(tmp_path / "extra.tar", [("a.png", _png()), ("a.cls", b"1"), ("a.seg.png", _png())])
    assert [s.key for s in read_shard(path)] == ["a"]


@pytest.mark.parametrize("payload,pattern", [
    (b"", r"not a tar archive \(zero bytes\)"),
    (np.random.default_rng(0).bytes(3000), r"truncated or not a tar archive \(3000 bytes"),
    (b"\x1f\x8b" + bytes(100), r"truncated or (not a|corrupt) tar archive"),  # gzip magic, junk
], ids=["empty", "random", "gzip-junk"])
def test_not_a_tar_is_one_line(tmp_path, payload, pattern):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "shard-000000.tar").write_bytes(payload)
    msg = _refusal(str(tmp_path / "ds" / "shard-000000.tar"), pattern)
    assert "method gz" not in msg


def test_not_a_tar_via_cli_is_one_line(tmp_path, capsys):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "shard-000000.tar").write_bytes(b"")
    assert cli(["info", str(tmp_path / "ds")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "shard-000000.tar: not a tar archive (zero bytes)" in err


@pytest.mark.parametrize("member", ["../evil", "/abs/evil", "a/../../evil", "bad\nkey"])
def test_unsafe_keys_are_refused_at_read_time(tmp_path, member):
    path = _shard(tmp_path / "keys.tar", [(f"{member}.png", _png()), (f"{member}.cls", b"1")])
    msg = _refusal(path, rf"shard .*keys.tar, sample {repr(member)[1:-1]!r}: sample key .* "
                         "is not usable")
    assert "\n" not in msg
    with pytest.raises(ShardError, match="not usable"):  # and on write, as before
        shard_bytes([Sample(member, np.zeros((4, 4, 3), np.uint8), 1)])


@pytest.mark.parametrize("label,pattern", [(b"-1", "label -1 is negative"),
                                           (b"1.5", "is not an integer"),
                                           (b"cat\n", "is not an integer")])
def test_bad_labels_still_refused(tmp_path, label, pattern):
    path = _shard(tmp_path / "lab.tar", [("a.png", _png()), ("a.cls", label)])
    _refusal(path, rf"shard .*lab.tar, sample 'a': .*{pattern}")


def test_hidden_members_are_skipped(tmp_path):
    path = _shard(tmp_path / "h.tar", [(".DS_Store", b"junk"), ("a.png", _png()), ("a.cls", b"3"),
                                       ("._a.png", b"appledouble"), ("__index__.json", b"{}")])
    assert [(s.key, s.label) for s in read_shard(path)] == [("a", 3)]


def test_shard_bytes_unchanged_for_valid_samples(tmp_path):
    rng = np.random.default_rng(3)
    samples = [Sample(f"k{i:03d}", rng.integers(0, 256, (5, 6, c), dtype=np.uint8), i % 4,
                      {"protected": bool(i % 2), "method": "em"})
               for i, c in enumerate([3] * 6)]
    data = shard_bytes(samples)
    back = parse_shard(data, "x")
    assert shard_bytes(back) == data  # read -> write is the identity on bytes
    write_samples(str(tmp_path / "ds"), samples, shard_size=4)
    assert [s.key for s in read_shard(str(tmp_path / "ds" / "shard-000000.tar"))] == \
        [f"k{i:03d}" for i in range(4)]
    # the format, rebuilt here by hand: USTAR, fixed owner/mtime/mode, png/cls/json per sample
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for s in samples:
            png = io.BytesIO()
            Image.fromarray(s.image).save(png, format="PNG", compress_level=6)
            for ext, payload in (("png", png.getvalue()), ("cls", str(s.label).encode()),
                                 ("json", json.dumps(s.meta, sort_keys=True).encode())):
                info = tarfile.TarInfo(f"{s.key}.{ext}")
                info.size, info.mtime, info.mode, info.uid, info.gid = len(payload), 0, 0o444, 0, 0
                info.uname = info.gname = "ue_dist"
                tar.addfile(info, io.BytesIO(payload))
    assert buf.getvalue() == data


# 7. options and paths: one line, exit 2, the option or path named ------------------------------
@pytest.mark.parametrize("argv,pattern", [
    (["--shard-size", "0"], r"--shard-size must be >= 1 .*got 0"),
    (["--shard-size", "-3"], r"--shard-size must be >= 1 .*got -3"),
    (["--image-size", "0"], r"--image-size must be >= 1 .*got 0"),
    (["--image-size", "-5"], r"--image-size must be >= 1 .*got -5"),
    (["--n", "0"], r"--n must be at least 20, got 0"),
    (["--n", "-4"], r"--n must be at least 20, got -4"),
    (["--seed", "-1"], r"--seed must be >= 0, got -1"),
])
def test_convert_options_are_checked(tmp_path, capsys, argv, pattern):
    import re
    assert cli(["convert", "synthetic", str(tmp_path / "out"), "--n", "40", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ue-dist convert: error: ")
    assert re.search(pattern, err), err
    assert not (tmp_path / "out").exists()


def test_convert_paths_are_checked(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    np.save(tmp_path / "y.npy", np.arange(4))
    cases = [
        (["imagefolder", str(afile), str(tmp_path / "o")], f"input '{afile}' is a file, not a folder"),
        (["imagefolder", str(tmp_path / "nope"), str(tmp_path / "o")], "'" + str(tmp_path / "nope")
         + "' does not exist"),
        (["numpy", str(tmp_path), str(tmp_path / "y.npy"), str(tmp_path / "o")],
         f"input '{tmp_path}' is a folder, not a .npy file"),
        (["synthetic", str(afile), "--n", "40"], f"output '{afile}' is an existing file"),
        (["synthetic", str(afile / "sub"), "--n", "40"], f"lies under '{afile}', which is a file"),
        (["digits", str(afile)], f"output '{afile}' is an existing file"),
    ]
    for argv, needle in cases:
        assert cli(["convert", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, (argv, err)
    assert afile.read_text() == "x" and sorted(os.listdir(tmp_path)) == ["afile", "y.npy"]


def test_info_on_a_file_names_it(tmp_path, capsys):
    write_samples(str(tmp_path / "ds"), [Sample("a", np.zeros((4, 4, 3), np.uint8), 0)])
    shard = tmp_path / "ds" / "shard-000000.tar"
    assert cli(["info", str(shard)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"'{shard}' is a file, not a folder of shards" in err
    assert cli(["info", str(tmp_path / "ds"), "--json"]) == 0
    assert '"samples": 1' in capsys.readouterr().out


def test_write_samples_refuses_bad_shard_size_and_file_output(tmp_path):
    from ue_dist.data.storage import StorageError
    from ue_dist.errors import UserError
    one = [Sample("a", np.zeros((4, 4, 3), np.uint8), 0)]
    with pytest.raises(UserError, match="--shard-size must be >= 1"):
        write_samples(str(tmp_path / "ds"), one, shard_size=0)
    (tmp_path / "f").write_text("x")
    with pytest.raises(StorageError, match="is an existing file"):
        write_samples(str(tmp_path / "f"), one)


@pytest.mark.parametrize("members,pattern", [
    ([("a.png", _png()), ("a.cls", b"99999999999999999999999")], r"sample 'a': label .* 64 bits"),
    ([("a.png", _png()), ("a.cls", b"1"), ("a.json", b"[1, 2]")], r"a.json holds a list, not a JSON"),
])
def test_oversized_labels_and_non_object_meta(tmp_path, members, pattern):
    _refusal(_shard(tmp_path / "m.tar", members), pattern)


def test_error_messages_are_one_line():
    assert str(ShardError("shard x: a\nb\r\nc")) == "shard x: a b c"
    assert str(ConvertError("imagefolder: /p/bad\nname.png is not decodable")) == \
        "imagefolder: /p/bad name.png is not decodable"
    import pickle as _pickle  # Ray ships these across processes
    assert str(_pickle.loads(_pickle.dumps(ShardError("a\nb")))) == "a b"
