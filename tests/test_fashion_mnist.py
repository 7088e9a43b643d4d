"""IDX (MNIST-format) reading and the ``fashion-mnist`` / ``idx`` converters.

The reader and converters are tested on small IDX files written here (gzip and plain; every kind
of bad input, each refused with one line naming the file and nothing written). The tests on the
real Fashion-MNIST files run where they are installed (``apt-get install dataset-fashion-mnist``
puts them in /usr/share/datasets/fashion-mnist; .ci/run installs it where it can) and are
skipped, with that said, where they are not.
"""
from __future__ import annotations

import gzip
import json
import os
import struct
import tarfile
import time
from collections import Counter

import numpy as np
import pytest

from ue_dist.cli import main as cli
from ue_dist.data import converters
from ue_dist.data.converters import (FASHION_MNIST_CLASSES, ConvertError, convert_fashion_mnist,
                                     convert_idx, idx_array, idx_pair)
from ue_dist.data.dataset import dataset_info, load_imageset
from ue_dist.data.shards import read_shard
from ue_dist.data.sources import _resize


def idx_bytes(arr: np.ndarray, type_code: int = 0x08) -> bytes:
    arr = np.asarray(arr)
    return (bytes([0, 0, type_code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
            + arr.tobytes())


def write_idx(path, arr, gz=False, type_code=0x08) -> str:
    blob = idx_bytes(arr, type_code)
    with open(path, "wb") as f:
        f.write(gzip.compress(blob) if gz else blob)
    return str(path)


def small_set(n=40, h=28, w=28, classes=10, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n, h, w), dtype=np.uint8),
            (np.arange(n) % classes).astype(np.uint8))


def shards_under(folder) -> list[str]:
    return [os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs if f.endswith(".tar")]


def one_line_error(capsys, argv) -> str:
    assert cli(argv) == 2, argv
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ue-dist convert: error: "), err
    return err


# 1. the reader -----------------------------------------------------------------------------------
@pytest.mark.parametrize("gz", [False, True])
def test_idx_array_reads_images_and_labels(tmp_path, gz):
    x, y = small_set(7, 5, 6)
    name = "imgs.gz" if not gz else "imgs"  # compression is told by the bytes, not the name
    got = idx_array(write_idx(tmp_path / name, x, gz=gz), ndim=3)
    assert got.dtype == np.uint8 and got.shape == (7, 5, 6) and np.array_equal(got, x)
    assert got.flags.writeable
    labels = idx_array(write_idx(tmp_path / "labels", y, gz=gz), ndim=1)
    assert np.array_equal(labels, y)
    xs, ys = idx_pair(str(tmp_path / name), str(tmp_path / "labels"))
    assert xs.shape == (7, 5, 6, 1) and ys.dtype == np.int64


def test_idx_array_through_fsspec(tmp_path):
    import fsspec
    x, _ = small_set(3, 4, 4)
    with fsspec.open("memory://idx-test/imgs.gz", "wb") as f:
        f.write(gzip.compress(idx_bytes(x)))
    assert np.array_equal(idx_array("memory://idx-test/imgs.gz", ndim=3), x)


def _bad_files(tmp_path):
    x, y = small_set(6, 4, 4)
    good_x, good_y = idx_bytes(x), idx_bytes(y)
    return {
        "magic": (b"\x12\x34" + good_x[2:], good_y, r"is not an IDX file \(magic number 0x1234"),
        "empty": (b"", good_y, r"is not an IDX file \(magic number 0xempty"),
        "type": (idx_bytes(x.astype(">f4"), 0x0D), good_y, r"IDX type 0x0d \(float32\); only 0x08"),
        "truncated": (good_x[:-5], good_y, r"is truncated: the header says 6 x 4 x 4 = 96 bytes "
                                          r"of data, the file holds 91"),
        "header": (good_x[:9], good_y, r"is truncated: 9 bytes, shorter than its 16-byte header"),
        "overlong": (good_x + b"\0\0", good_y, r"has 2 bytes after the 6 x 4 x 4 = 96 bytes"),
        "count": (good_x, idx_bytes(y[:5]), r"holds 6 images but .* holds 5 labels"),
        "gzip": (gzip.compress(good_x)[:-12], good_y, r"is gzip-compressed but does not decompress"),
        "labels-ndim": (good_x, idx_bytes(y.reshape(2, 3)),
                        r"labels.idx has 2 dimension\(s\); expected labels: one dimension"),
        "images-ndim": (idx_bytes(x.reshape(6, 16)), good_y,
                        r"images.idx has 2 dimension\(s\); expected images: three dimensions"),
    }


@pytest.mark.parametrize("case", ["magic", "empty", "type", "truncated", "header", "overlong",
                                  "count", "gzip", "labels-ndim", "images-ndim"])
def test_bad_idx_input_is_one_line_naming_the_file_and_writes_nothing(tmp_path, capsys, case):
    import re
    images, labels, pattern = _bad_files(tmp_path)[case]
    (tmp_path / "images.idx").write_bytes(images)
    (tmp_path / "labels.idx").write_bytes(labels)
    out = tmp_path / "out"
    err = one_line_error(capsys, ["convert", "idx", str(tmp_path / "images.idx"),
                                  str(tmp_path / "labels.idx"), str(out)])
    assert re.search(pattern, err), err
    assert "images.idx" in err or "labels.idx" in err
    assert not shards_under(out) and not out.exists()
    with pytest.raises(ConvertError, match=pattern):
        idx_pair(str(tmp_path / "images.idx"), str(tmp_path / "labels.idx"))


def test_bad_test_pair_writes_no_train_either(tmp_path, capsys):
    x, y = small_set(20)
    paths = [write_idx(tmp_path / "tr-x", x), write_idx(tmp_path / "tr-y", y),
             write_idx(tmp_path / "te-x", x[:5]), write_idx(tmp_path / "te-y", y[:4])]
    out = tmp_path / "out"
    err = one_line_error(capsys, ["convert", "idx", *paths, str(out)])
    assert "te-x holds 5 images but" in err and "te-y holds 4 labels" in err
    assert not out.exists()


# 2. convert idx ----------------------------------------------------------------------------------
def test_convert_idx_one_pair_is_split_seeded_and_stratified(tmp_path, capsys):
    x, y = small_set(50)
    imgs, labs = write_idx(tmp_path / "x.gz", x, gz=True), write_idx(tmp_path / "y", y)
    out = tmp_path / "out"
    assert cli(["convert", "idx", imgs, labs, str(out), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["train"]["samples"] == 40 and r["test"]["samples"] == 10 and r["source"] == "idx"
    test = dataset_info(str(out / "test"))
    assert test["label_histogram"] == {str(c): 1 for c in range(10)}  # stratified
    assert test["image_shape"] == [32, 32, 3]  # default: CIFAR-shaped like digits
    # keys name each sample's position in the file; images are the file's, resized
    s = load_imageset(str(out / "test"))
    for key, img, label in zip(s.keys, s.numpy_hwc(), s.labels.tolist()):
        i = int(key.split("-")[1])
        assert key == f"idx-{i:06d}" and label == y[i]
        assert np.array_equal(img, np.repeat(_resize(x[i][None, ..., None], 32)[0], 3, 2))
    # the same seed gives the same split; another seed another one
    assert cli(["convert", "idx", imgs, labs, str(tmp_path / "again")]) == 0
    assert cli(["convert", "idx", imgs, labs, str(tmp_path / "other"), "--seed", "1"]) == 0
    capsys.readouterr()
    keys = lambda d: sorted(load_imageset(str(d / "test")).keys)  # noqa: E731
    assert keys(out) == keys(tmp_path / "again") != keys(tmp_path / "other")


def test_convert_idx_two_pairs_keeps_the_given_split(tmp_path, capsys):
    x, y = small_set(30)
    xt, yt = small_set(12, seed=1)
    paths = [write_idx(tmp_path / "a", x), write_idx(tmp_path / "b.gz", y, gz=True),
             write_idx(tmp_path / "c.gz", xt, gz=True), write_idx(tmp_path / "d", yt)]
    out = tmp_path / "out"
    assert cli(["convert", "idx", *paths, str(out), "--native", "--shard-size", "7"]) == 0
    capsys.readouterr()
    train, test = dataset_info(str(out / "train")), dataset_info(str(out / "test"))
    assert (train["samples"], train["shards"], test["samples"]) == (30, 5, 12)
    assert train["image_shape"] == [28, 28, 1]  # --native: the stored 28x28 grayscale
    s = read_shard(sorted(shards_under(out / "train"))[0])
    assert [t.key for t in s[:2]] == ["idx-train-000000", "idx-train-000001"]
    assert np.array_equal(s[1].image[..., 0], x[1]) and s[1].label == y[1]
    # --channels 3 with --native: 28x28x3; --image-size 16 --channels 1: 16x16x1
    assert cli(["convert", "idx", *paths, str(tmp_path / "o3"), "--native", "--channels", "3"]) == 0
    assert cli(["convert", "idx", *paths, str(tmp_path / "o1"), "--image-size", "16",
                "--channels", "1"]) == 0
    capsys.readouterr()
    assert dataset_info(str(tmp_path / "o3" / "test"))["image_shape"] == [28, 28, 3]
    assert dataset_info(str(tmp_path / "o1" / "test"))["image_shape"] == [16, 16, 1]


def test_convert_idx_paths_and_options_are_checked(tmp_path, capsys):
    x, y = small_set(20)
    imgs, labs = write_idx(tmp_path / "x", x), write_idx(tmp_path / "y", y)
    out = str(tmp_path / "out")
    cases = [
        (["idx", imgs, out], "convert idx expects IMAGES LABELS [TEST_IMAGES TEST_LABELS] OUT, "
                             "got 2 path(s)"),
        (["idx", imgs, labs, imgs, out], "got 4 path(s)"),
        (["idx", str(tmp_path), labs, out], f"input '{tmp_path}' is a folder, not an IDX file"),
        (["idx", str(tmp_path / "nope"), labs, out], "does not exist"),
        (["idx", imgs, labs, out, "--channels", "2"], "--channels must be 1 or 3, got 2"),
        (["idx", imgs, labs, out, "--native", "--image-size", "32"],
         "--native keeps the original size; it excludes --image-size 32"),
        (["numpy", imgs, labs, out, "--channels", "1"],
         "--channels applies to digits, fashion-mnist, idx only"),
    ]
    for argv, needle in cases:
        err = one_line_error(capsys, ["convert", *argv])
        assert needle in err, (argv, err)
    assert not os.path.exists(out)


# 3. convert fashion-mnist from a folder (small files under the official names) --------------------
def _fake_fashion_folder(folder, gz_names=True, n_train=30, n_test=10):
    folder.mkdir(parents=True, exist_ok=True)
    x, y = small_set(n_train)
    xt, yt = small_set(n_test, seed=1)
    arrays = {"train-images-idx3-ubyte": x, "train-labels-idx1-ubyte": y,
              "t10k-images-idx3-ubyte": xt, "t10k-labels-idx1-ubyte": yt}
    for i, (stem, arr) in enumerate(arrays.items()):
        gz = gz_names if isinstance(gz_names, bool) else i % 2 == 0
        write_idx(folder / (stem + (".gz" if gz else "")), arr, gz=gz)
    return arrays


@pytest.mark.parametrize("gz_names", [True, False, "mixed"])
def test_convert_fashion_mnist_from_a_folder(tmp_path, capsys, gz_names):
    arrays = _fake_fashion_folder(tmp_path / "fm", gz_names)
    out = tmp_path / "out"
    assert cli(["convert", "fashion-mnist", str(tmp_path / "fm"), str(out), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["classes"] == FASHION_MNIST_CLASSES and r["source"] == "fashion-mnist"
    assert (r["train"]["samples"], r["test"]["samples"]) == (30, 10)
    manifest = json.loads((out / "train" / "_dataset.json").read_text())
    assert manifest["classes"] == FASHION_MNIST_CLASSES and manifest["split"] == "train"
    s = read_shard(shards_under(out / "test")[0])
    assert s[0].key == "fashion-mnist-test-000000" and s[0].image.shape == (32, 32, 3)
    expect = np.repeat(_resize(arrays["t10k-images-idx3-ubyte"][:1, ..., None], 32), 3, 3)[0]
    assert np.array_equal(s[0].image, expect)


def test_train_images_keeps_a_seeded_balanced_subset_with_the_full_conversions_keys(tmp_path,
                                                                                   capsys):
    _fake_fashion_folder(tmp_path / "fm", n_train=40)  # labels 0..9, 4 each
    full, sub = tmp_path / "full", tmp_path / "sub"
    assert cli(["convert", "fashion-mnist", str(tmp_path / "fm"), str(full)]) == 0
    assert cli(["convert", "fashion-mnist", str(tmp_path / "fm"), str(sub), "--train-images", "23",
                "--seed", "3", "--json"]) == 0
    r = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert (r["train"]["samples"], r["test"]["samples"]) == (23, 10)  # the test split whole
    assert r["train_subset"] == {"images": 23, "seed": 3, "of": 40}
    whole = {t.key: t for f in shards_under(full / "train") for t in read_shard(f)}
    kept = [t for f in sorted(shards_under(sub / "train")) for t in read_shard(f)]
    # 23 = 2 per class + 3 more: no class has fewer than 2 or more than 3
    assert sorted(Counter(t.label for t in kept).values()) == [2] * 7 + [3] * 3
    for t in kept:  # the key is the image's key in the full conversion, the pixels the same
        assert np.array_equal(t.image, whole[t.key].image) and t.label == whole[t.key].label
    again = tmp_path / "again"
    assert cli(["convert", "fashion-mnist", str(tmp_path / "fm"), str(again), "--train-images",
                "23", "--seed", "3"]) == 0
    assert [t.key for f in sorted(shards_under(again / "train")) for t in read_shard(f)] == \
        [t.key for t in kept]  # seeded
    capsys.readouterr()
    for argv, needle in [
            (["--train-images", "41"], "a subset of 41 samples asked for, it holds 40"),
            (["--train-images", "0"], "--train-images"),
    ]:
        err = one_line_error(capsys, ["convert", "fashion-mnist", str(tmp_path / "fm"),
                                      str(tmp_path / "bad"), *argv])
        assert needle in err, (argv, err)
    err = one_line_error(capsys, ["convert", "digits", str(tmp_path / "bad"), "--train-images", "5"])
    assert "--train-images applies to fashion-mnist and idx only" in err
    assert not os.path.exists(tmp_path / "bad")


def test_convert_idx_train_images_subsets_the_train_part_of_a_split_pair(tmp_path, capsys):
    x, y = small_set(50)
    paths = [write_idx(tmp_path / "x", x), write_idx(tmp_path / "y", y)]
    assert cli(["convert", "idx", *paths, str(tmp_path / "full"), "--native"]) == 0
    assert cli(["convert", "idx", *paths, str(tmp_path / "sub"), "--native",
                "--train-images", "20"]) == 0
    capsys.readouterr()
    full = {t.key for f in shards_under(tmp_path / "full" / "train") for t in read_shard(f)}
    kept = [t for f in shards_under(tmp_path / "sub" / "train") for t in read_shard(f)]
    assert len(kept) == 20 and {t.key for t in kept} <= full  # keys: positions in the file
    for t in kept:
        assert np.array_equal(t.image[..., 0], x[int(t.key.rsplit("-", 1)[1])])
    assert dataset_info(str(tmp_path / "sub" / "test"))["samples"] == 10  # untouched


def test_balanced_subset_tops_up_a_class_too_small_for_its_share():
    labels = np.array([0] * 2 + [1] * 10 + [2] * 10)
    chosen = converters.balanced_subset(labels, 15, seed=0)
    assert len(chosen) == 15 and len(set(chosen.tolist())) == 15
    assert Counter(labels[chosen].tolist())[0] == 2  # all it has; the others make up the rest
    assert np.array_equal(chosen, np.sort(chosen))


def test_convert_fashion_mnist_from_an_fsspec_url(tmp_path):
    import fsspec
    arrays = _fake_fashion_folder(tmp_path / "fm")
    for name in os.listdir(tmp_path / "fm"):
        with fsspec.open(f"memory://fm-src/{name}", "wb") as f:
            f.write((tmp_path / "fm" / name).read_bytes())
    r = convert_fashion_mnist("memory://fm-out", "memory://fm-src", image_size=None, channels=1)
    assert r["train"]["samples"] == 30
    s = load_imageset("memory://fm-out/train")
    assert s.image_shape == (1, 28, 28) and s.keys[0] == "fashion-mnist-train-000000"
    assert np.array_equal(s.labels.numpy(), arrays["train-labels-idx1-ubyte"])


def test_fashion_mnist_missing_files_say_how_to_get_them(tmp_path, capsys, monkeypatch):
    empty = tmp_path / "nothing-here"
    empty.mkdir()
    monkeypatch.setattr(converters, "FASHION_MNIST_DIRS", [str(empty), str(tmp_path / "absent")])
    out = tmp_path / "out"
    err = one_line_error(capsys, ["convert", "fashion-mnist", str(out)])
    assert f"not in any of {empty}, {tmp_path / 'absent'}" in err
    assert "apt-get install dataset-fashion-mnist" in err
    assert "github.com/zalandoresearch/fashion-mnist" in err
    assert "train-images-idx3-ubyte[.gz]" in err
    # a folder that lacks one file names it; a folder that does not exist says so
    _fake_fashion_folder(tmp_path / "fm")
    os.remove(tmp_path / "fm" / "t10k-labels-idx1-ubyte.gz")
    err = one_line_error(capsys, ["convert", "fashion-mnist", str(tmp_path / "fm"), str(out)])
    assert f"folder {tmp_path / 'fm'} lacks t10k-labels-idx1-ubyte[.gz]" in err
    assert "apt-get install dataset-fashion-mnist" in err
    err = one_line_error(capsys, ["convert", "fashion-mnist", str(tmp_path / "no"), str(out)])
    assert f"folder '{tmp_path / 'no'}' does not exist" in err and "zalandoresearch" in err
    err = one_line_error(capsys, ["convert", "fashion-mnist", str(tmp_path / "fm" /
                                  "train-labels-idx1-ubyte.gz"), str(out)])
    assert "is a file, not the folder holding the four IDX files" in err
    assert not out.exists()


def test_fashion_mnist_bad_test_file_writes_nothing(tmp_path, capsys):
    _fake_fashion_folder(tmp_path / "fm")
    (tmp_path / "fm" / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8bnot really gzip")
    err = one_line_error(capsys, ["convert", "fashion-mnist", str(tmp_path / "fm"),
                                  str(tmp_path / "out")])
    assert "t10k-images-idx3-ubyte.gz is gzip-compressed but does not decompress" in err
    assert not (tmp_path / "out").exists()  # the valid train split was not written either
    # labels outside Fashion-MNIST's ten classes
    _fake_fashion_folder(tmp_path / "fm2")
    write_idx(tmp_path / "fm2" / "train-labels-idx1-ubyte.gz", np.full(30, 10, np.uint8), gz=True)
    err = one_line_error(capsys, ["convert", "fashion-mnist", str(tmp_path / "fm2"),
                                  str(tmp_path / "out")])
    assert "train-labels-idx1-ubyte.gz holds label 10; Fashion-MNIST has labels 0..9" in err
    assert not (tmp_path / "out").exists()


def test_fashion_mnist_output_inside_the_input_is_refused(tmp_path, capsys):
    _fake_fashion_folder(tmp_path / "fm")
    err = one_line_error(capsys, ["convert", "fashion-mnist", str(tmp_path / "fm"),
                                  str(tmp_path / "fm" / "out")])
    assert "lies inside the input" in err and not (tmp_path / "fm" / "out").exists()


# 4. the real files, where installed --------------------------------------------------------------
def _installed_folder() -> str | None:
    try:
        return converters.fashion_mnist_files()[0]
    except ConvertError:
        return None


REAL = _installed_folder()
needs_real = pytest.mark.skipif(
    REAL is None, reason="Fashion-MNIST IDX files not installed: `apt-get install "
    "dataset-fashion-mnist` (puts them in /usr/share/datasets/fashion-mnist) or download the "
    "four files from github.com/zalandoresearch/fashion-mnist into one of "
    + ", ".join(converters.FASHION_MNIST_DIRS))


def _labels_in_shards(folder) -> tuple[Counter, int, list[str]]:
    """Label counts read from the shards' .cls members (no PNG decoding: fast)."""
    counts: Counter = Counter()
    keys: list[str] = []
    shards = sorted(shards_under(folder))
    for shard in shards:
        with tarfile.open(shard) as tar:
            for m in tar:
                if m.name.endswith(".cls"):
                    counts[int(tar.extractfile(m).read())] += 1
                    keys.append(m.name[:-4])
    return counts, len(shards), keys


@needs_real
def test_real_fashion_mnist_reader():
    images = idx_array(os.path.join(REAL, "train-images-idx3-ubyte.gz"), ndim=3)
    labels = idx_array(os.path.join(REAL, "t10k-labels-idx1-ubyte.gz"), ndim=1)
    assert images.shape == (60000, 28, 28) and labels.shape == (10000,)
    assert np.bincount(labels).tolist() == [1000] * 10


@needs_real
def test_real_fashion_mnist_convert(tmp_path, capsys):
    out = tmp_path / "fm"
    start = time.monotonic()
    assert cli(["convert", "fashion-mnist", str(out), "--json"]) == 0  # default: the installed files
    seconds = time.monotonic() - start
    r = json.loads(capsys.readouterr().out)
    assert r["train"] == {"url": str(out / "train"), "samples": 60000, "shards": 60}
    assert r["test"] == {"url": str(out / "test"), "samples": 10000, "shards": 10}
    assert r["classes"] == FASHION_MNIST_CLASSES
    counts, n_shards, keys = _labels_in_shards(out / "train")
    assert n_shards == 60 and sum(counts.values()) == 60000
    assert counts == {c: 6000 for c in range(10)}
    assert keys[:2] == ["fashion-mnist-train-000000", "fashion-mnist-train-000001"]
    assert keys[-1] == "fashion-mnist-train-059999" and len(set(keys)) == 60000
    test = dataset_info(str(out / "test"))  # decodes every test image
    assert test["samples"] == 10000 and test["shards"] == 10
    assert test["label_histogram"] == {str(c): 1000 for c in range(10)}
    assert test["image_shape"] == [32, 32, 3]
    # the first training image is the file's first image, resized as digits are
    first = read_shard(sorted(shards_under(out / "train"))[0])[0]
    raw = idx_array(os.path.join(REAL, "train-images-idx3-ubyte.gz"), ndim=3)[:1, ..., None]
    assert np.array_equal(first.image, np.repeat(_resize(raw, 32), 3, 3)[0])
    print(f"convert fashion-mnist: {seconds:.1f} s")


@needs_real
def test_demo_data_is_a_balanced_seeded_subset_of_the_real_files():
    from ue_dist.runtime.demo import FASHION_MNIST_DEMO_TRAIN, _demo_arrays

    splits, keys, extra = _demo_arrays("fashion-mnist")
    x, y = splits["train"]
    assert x.shape == (FASHION_MNIST_DEMO_TRAIN, 32, 32, 3) and extra["classes"] == FASHION_MNIST_CLASSES
    assert np.bincount(y).tolist() == [FASHION_MNIST_DEMO_TRAIN // 10] * 10
    assert splits["test"][0].shape == (10000, 32, 32, 3)  # the whole official test set
    assert np.bincount(splits["test"][1]).tolist() == [1000] * 10
    # each key names the image's position in the official file, and the image is that one
    raw = idx_array(os.path.join(REAL, "train-images-idx3-ubyte.gz"), ndim=3)
    positions = [int(k.rsplit("-", 1)[1]) for k in keys["train"]]
    assert positions == sorted(set(positions)) and len(positions) == FASHION_MNIST_DEMO_TRAIN
    for i in (0, 1234, FASHION_MNIST_DEMO_TRAIN - 1):
        p = positions[i]
        assert np.array_equal(x[i], np.repeat(_resize(raw[p:p + 1, ..., None], 32), 3, 3)[0])
    assert _demo_arrays("fashion-mnist")[1] == keys  # seeded: the same subset every time


def test_demo_refuses_a_folder_holding_another_datasets_demo(tmp_path):
    from ue_dist.core.config import SettingsError
    from ue_dist.runtime.demo import _demo_data

    (tmp_path / "data" / "train").mkdir(parents=True)  # what a digits demo leaves
    (tmp_path / "data" / "train" / "_dataset.json").write_text('{"source": "digits"}')
    with pytest.raises(SettingsError, match="holds the digits demo's data, not the fashion-mnist"):
        _demo_data(str(tmp_path / "data"), "fashion-mnist", None, None)  # one folder, one dataset
