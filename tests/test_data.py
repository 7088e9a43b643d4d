"""Data layer: round trips on local/memory/S3, WebDataset interop, converters, bad input."""
from __future__ import annotations

import io
import json
import os
import pickle
import tarfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from ue_dist.cli import main as cli
from ue_dist.data import shards as shards_mod
from ue_dist.data import storage
from ue_dist.data.converters import ConvertError, convert_cifar, convert_imagefolder, \
    convert_numpy, synthetic_arrays
from ue_dist.data.dataset import dataset_info, load_imageset, write_imageset, write_samples
from ue_dist.data.imageset import ImageSet
from ue_dist.data.shards import Sample, ShardError, list_shards, parse_shard, read_shard, \
    shard_bytes


def _imageset(n=25, h=8, w=8, c=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, h, w, c), dtype=np.uint8)
    y = rng.integers(0, 5, size=n)
    return ImageSet.from_numpy_hwc(x, y, [f"s{i:04d}" for i in range(n)],
                                   [{"protected": bool(i % 2), "method": "em" if i % 2 else None}
                                    for i in range(n)], num_classes=5)


def _assert_same(a: ImageSet, b: ImageSet):
    assert a.keys == b.keys
    assert np.array_equal(a.images.numpy(), b.images.numpy())
    assert np.array_equal(a.labels.numpy(), b.labels.numpy())
    assert [m["protected"] for m in a.meta] == [m["protected"] for m in b.meta]


@pytest.mark.parametrize("scheme", ["local", "file", "memory"])
def test_round_trip_local_and_memory(tmp_path, scheme):
    url = {"local": str(tmp_path / "ds"), "file": f"file://{tmp_path}/ds",
           "memory": f"memory://rt-{os.urandom(4).hex()}/ds"}[scheme]
    original = _imageset()
    shards = write_imageset(url, original, shard_size=10)
    assert len(shards) == 3 and list_shards(url) == shards
    _assert_same(original, load_imageset(url))
    info = dataset_info(url)
    assert info["samples"] == 25 and info["shards"] == 3 and info["image_shape"] == [8, 8, 3]
    assert info["protected"] == 12 and sum(info["label_histogram"].values()) == 25


def test_round_trip_s3_through_real_http_api(s3_bucket):
    url = f"{s3_bucket}/data/train"
    original = _imageset(n=30)
    write_imageset(url, original, shard_size=12)
    assert [u.rsplit("/", 1)[1] for u in list_shards(url)] == \
        ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    _assert_same(original, load_imageset(url))
    # the objects really are on the server: boto3 sees them
    import boto3
    bucket = s3_bucket[len("s3://"):]
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket)["Contents"]]
    assert "data/train/shard-000001.tar" in keys


def test_convert_digits_to_s3_via_cli(s3_bucket, capsys):
    assert cli(["convert", "digits", f"{s3_bucket}/digits", "--shard-size", "700", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["train"]["samples"] == 1437 and out["test"]["samples"] == 360
    assert cli(["info", f"{s3_bucket}/digits/train", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info == {**info, "samples": 1437, "shards": 3, "image_shape": [32, 32, 3],
                    "num_classes": 10, "protected": 0}


def test_missing_s3_bucket_is_named(s3_server):
    with pytest.raises(storage.StorageError, match="no-such-bucket-xyz"):
        write_imageset("s3://no-such-bucket-xyz/ds", _imageset())
    assert cli(["info", "s3://no-such-bucket-xyz/ds"]) == 2


def test_webdataset_reads_our_shards(tmp_path):
    import webdataset as wds

    write_imageset(str(tmp_path / "ds"), _imageset(n=7), shard_size=100)
    rows = list(wds.WebDataset(str(tmp_path / "ds" / "shard-000000.tar"), shardshuffle=False)
                .decode("rgb8"))
    assert [r["__key__"] for r in rows] == [f"s{i:04d}" for i in range(7)]
    assert rows[0]["png"].shape == (8, 8, 3) and "cls" in rows[0] and "json" in rows[0]


def test_shard_bytes_are_deterministic():
    samples = [Sample(f"k{i}", np.full((4, 4, 3), i, np.uint8), i, {"protected": False})
               for i in range(5)]
    assert shard_bytes(samples) == shard_bytes(samples)
    assert [s.key for s in parse_shard(shard_bytes(samples), "x")] == [f"k{i}" for i in range(5)]


_KEY_PART = st.text(st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="./"),
                    min_size=1, max_size=40)


@settings(max_examples=40, deadline=None)
@given(keys=st.lists(st.lists(_KEY_PART, min_size=1, max_size=4).map("/".join), max_size=6,
                     unique=True),
       sizes=st.lists(st.integers(1, 9), min_size=6, max_size=6),
       labels=st.lists(st.integers(0, 10**9), min_size=6, max_size=6))
def test_shard_bytes_equal_what_tarfile_writes(keys, sizes, labels):
    """The hand-built USTAR headers give exactly tarfile's bytes: any key (nested, non-ASCII,
    long enough that a member name needs USTAR's prefix field, which goes through tarfile),
    any image size and label; and tarfile reads the members back in order."""
    samples = [Sample(k, np.full((sizes[i], sizes[-1 - i], 3), i, np.uint8), labels[i],
                      {"key": k}) for i, k in enumerate(keys)]
    reference = io.BytesIO()
    with tarfile.open(fileobj=reference, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for s in samples:
            for ext, payload in (("png", shards_mod.encode_png(s.image)),
                                 ("cls", str(s.label).encode()),
                                 ("json", json.dumps(s.meta, sort_keys=True).encode())):
                info = tarfile.TarInfo(f"{s.key}.{ext}")
                info.size, info.mtime, info.mode = len(payload), 0, 0o444
                info.uname = info.gname = "ue_dist"
                tar.addfile(info, io.BytesIO(payload))
    data = shard_bytes(samples)
    assert data == reference.getvalue()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert [m.name for m in tar] == [f"{k}.{e}" for k in keys for e in ("png", "cls", "json")]


def test_grayscale_and_native_digits(tmp_path):
    assert cli(["convert", "digits", str(tmp_path / "d8"), "--native"]) == 0
    s = load_imageset(str(tmp_path / "d8" / "train"))
    assert s.image_shape == (3, 8, 8)
    gray = ImageSet.from_numpy_hwc(np.zeros((3, 5, 5, 1), np.uint8), np.array([0, 1, 2]))
    write_imageset(str(tmp_path / "g"), gray)
    assert load_imageset(str(tmp_path / "g")).image_shape == (1, 5, 5)


# bad input ------------------------------------------------------------------------------------
def _write_tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def _png(shape=(4, 4, 3)):
    buf = io.BytesIO()
    Image.fromarray(np.zeros(shape, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_truncated_tar_names_the_shard(tmp_path):
    write_imageset(str(tmp_path / "ds"), _imageset(n=20), shard_size=100)
    shard = tmp_path / "ds" / "shard-000000.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2 + 100])
    with pytest.raises(ShardError, match="shard-000000.tar"):
        read_shard(str(shard))


@pytest.mark.parametrize("members,pattern", [
    ([("a.png", b"not an image"), ("a.cls", b"1")], r"sample 'a'.*not a decodable image"),
    ([("a.png", _png()), ("a.cls", b"cat")], r"sample 'a'.*not an integer"),
    ([("a.png", _png()), ("a.jpg", _png()), ("a.cls", b"1")], r"sample 'a'.*two image members"),
])
def test_bad_samples_name_shard_and_sample(tmp_path, members, pattern):
    path = tmp_path / "bad.tar"
    _write_tar(path, members)
    with pytest.raises(ShardError, match=pattern) as info:
        read_shard(str(path))
    assert "bad.tar" in str(info.value)


def test_mixed_shapes_across_shards(tmp_path):
    write_samples(str(tmp_path / "ds"), [Sample("a", np.zeros((4, 4, 3), np.uint8), 0)])
    _write_tar(tmp_path / "ds" / "shard-000001.tar", [("b.png", _png((6, 6, 3))), ("b.cls", b"0")])
    with pytest.raises(ShardError, match=r"shard-000001.tar, sample 'b'.*mixed image shapes"):
        load_imageset(str(tmp_path / "ds"))


def test_nothing_written_when_input_is_bad(tmp_path):
    samples = [Sample("a", np.zeros((4, 4, 3), np.uint8), 0),
               Sample("b", np.zeros((5, 4, 3), np.uint8), 1)]
    with pytest.raises(ShardError, match="'b'.*mixed"):
        write_samples(str(tmp_path / "out"), samples, shard_size=1)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_output_inside_input_is_refused(tmp_path):
    folder = tmp_path / "imgs" / "cat"
    folder.mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(folder / "x.png")
    with pytest.raises(storage.StorageError, match="inside the input"):
        convert_imagefolder(str(tmp_path / "imgs"), str(tmp_path / "imgs" / "out"))
    assert not (tmp_path / "imgs" / "out").exists()


def test_unknown_converter_lists_choices(capsys):
    # the converters are the choices of convert's SOURCE argument (ue_dist/options.py): argparse
    # refuses an unknown one with exit status 2, listing them
    with pytest.raises(SystemExit) as exited:
        cli(["convert", "mnist", "out"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'mnist'" in err and "digits" in err and "imagefolder" in err


def test_refuses_to_overwrite_existing_shards(tmp_path):
    write_imageset(str(tmp_path / "ds"), _imageset())
    with pytest.raises(storage.StorageError, match="already holds"):
        write_imageset(str(tmp_path / "ds"), _imageset())


# converters -----------------------------------------------------------------------------------
def test_cifar10_from_pickle_archive(tmp_path):
    rng = np.random.default_rng(0)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, n in [("data_batch_1", 6), ("data_batch_2", 4), ("test_batch", 5)]:
            blob = pickle.dumps({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                                 b"labels": list(rng.integers(0, 10, n))})
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    result = convert_cifar(str(archive), str(tmp_path / "out"))
    assert result["train"]["samples"] == 10 and result["test"]["samples"] == 5
    s = load_imageset(str(tmp_path / "out" / "train"))
    assert s.image_shape == (3, 32, 32) and s.num_classes == 10
    with pytest.raises(ConvertError, match="does not exist"):
        convert_cifar(str(tmp_path / "nothing.bin"), str(tmp_path / "o2"))
    (tmp_path / "junk.bin").write_bytes(b"junk")
    with pytest.raises(ConvertError, match="neither"):
        convert_cifar(str(tmp_path / "junk.bin"), str(tmp_path / "o3"))


def test_cifar10_archive_read_from_s3(s3_bucket, tmp_path):
    """A cluster job names the archive by URL (cluster/kuberay-rayjob.yaml: CIFAR10_PATH=s3://...)."""
    from ue_dist.data import storage

    rng = np.random.default_rng(1)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, n in [("data_batch_1", 3), ("test_batch", 2)]:
            blob = pickle.dumps({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                                 b"labels": list(rng.integers(0, 10, n))})
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    storage.write_bytes(f"{s3_bucket}/raw/cifar-10-python.tar.gz", buf.getvalue())
    result = convert_cifar(f"{s3_bucket}/raw/cifar-10-python.tar.gz", f"{s3_bucket}/out")
    assert result["train"]["samples"] == 3 and result["test"]["samples"] == 2
    assert load_imageset(f"{s3_bucket}/out/train").num_classes == 10
    with pytest.raises(ConvertError, match="does not exist"):
        convert_cifar(f"{s3_bucket}/raw/missing.tar.gz", f"{s3_bucket}/o2")
    storage.write_bytes(f"{s3_bucket}/raw/junk.bin", b"junk")
    with pytest.raises(ConvertError, match="not the python-pickle archive"):
        convert_cifar(f"{s3_bucket}/raw/junk.bin", f"{s3_bucket}/o3")


def test_imagefolder_and_numpy(tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(np.full((6, 6, 3), i * 10, np.uint8)).save(
                tmp_path / "imgs" / cls / f"img.{i}.png")
    result = convert_imagefolder(str(tmp_path / "imgs"), str(tmp_path / "out"))
    assert result["classes"] == ["cat", "dog"]
    # default --test-fraction 0: every image in OUT/train, no OUT/test
    assert result["train"]["samples"] == 10 and "test" not in result
    assert not (tmp_path / "out" / "test").exists()
    split = convert_imagefolder(str(tmp_path / "imgs"), str(tmp_path / "out-split"),
                                test_fraction=0.2)
    assert (split["train"]["samples"], split["test"]["samples"]) == (8, 2)
    keys = load_imageset(str(tmp_path / "out" / "train")).keys
    assert all("." not in k for k in keys) and len(set(keys)) == len(keys)
    (tmp_path / "imgs" / "cat" / "broken.png").write_bytes(b"garbage")
    with pytest.raises(ConvertError, match="broken.png"):
        convert_imagefolder(str(tmp_path / "imgs"), str(tmp_path / "out2"))
    x = np.random.default_rng(0).integers(0, 256, (20, 5, 5, 3), dtype=np.uint8)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", np.arange(20) % 4)
    r = convert_numpy(str(tmp_path / "x.npy"), str(tmp_path / "y.npy"), str(tmp_path / "np"))
    assert r["train"]["samples"] == 16
    np.save(tmp_path / "ybad.npy", np.linspace(0, 1, 20))
    with pytest.raises(ConvertError, match="non-integer"):
        convert_numpy(str(tmp_path / "x.npy"), str(tmp_path / "ybad.npy"), str(tmp_path / "np2"))


def test_synthetic_is_not_a_colour_lookup_table():
    x, y = synthetic_arrays(1000, seed=1)["train"]
    assert x.shape == (800, 32, 32, 3) and set(np.unique(y)) == set(range(10))
    # nearest class-mean colour is near chance: classes differ in shape/texture, not colour
    colour = x.reshape(len(x), -1, 3).mean(1)
    means = np.stack([colour[y == c].mean(0) for c in range(10)])
    pred = np.argmin(((colour[:, None] - means[None]) ** 2).sum(-1), 1)
    assert (pred == y).mean() < 0.3
