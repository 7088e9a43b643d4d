"""Photo folders: convert imagefolder (labels, split, resize modes, keys, EXIF, streaming into a
staging folder), export back to files, preview figures, info on mixed-size unlabelled sets."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
from PIL import Image

from ue_dist.cli import main as cli
from ue_dist.data import photo_io
from ue_dist.data.converters import ConvertError, convert_imagefolder
from ue_dist.data.dataset import dataset_info, load_imageset, write_samples
from ue_dist.data.shards import Sample, ShardError, list_shards, read_shard, write_shard


def _photo(path, h, w, seed=0, mode="RGB", fmt=None, **save):
    rng = np.random.default_rng(seed)
    shape = (h, w) if mode == "L" else (h, w, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path, fmt, **save)


def _samples(url):
    return [s for shard in list_shards(str(url)) for s in read_shard(shard)]


def _tree(root):
    return sorted(os.path.relpath(os.path.join(r, f), root)
                  for r, _, files in os.walk(root) for f in files)


@pytest.fixture
def photos(tmp_path):
    """Mixed sizes, nested folders, dotted names, a JPEG; two first-level folders."""
    root = tmp_path / "photos"
    _photo(root / "cat" / "a.b.png", 10, 14, 1)
    _photo(root / "cat" / "deep" / "x.jpg", 20, 8, 2, quality=95)
    _photo(root / "dog" / "d.png", 12, 12, 3)
    _photo(root / "dog" / "e.png", 6, 9, 4)
    return root


# keys ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rel", ["a/b.c.jpg", "x.png", "_hidden.png", "sp ace/ünï cödé.jpeg",
                                 "100%/50%.png", "a-b_c/D.E.F.tif", "日本/写真.jpg"])
def test_keys_are_reversible_and_webdataset_safe(rel):
    key = photo_io.path_key(rel)
    assert "." not in key and "/" not in key and not key.startswith(("_", "."))
    assert all(c.isascii() and (c.isalnum() or c in "%-_") for c in key)
    assert photo_io.key_path(key) == os.path.splitext(rel)[0]


def test_long_names_get_a_hashed_key():
    long_a, long_b = "d/" + "a" * 150 + ".jpg", "d/" + "a" * 149 + "b.jpg"
    ka, kb = photo_io.path_key(long_a), photo_io.path_key(long_b)
    assert len(ka) <= photo_io.MAX_KEY and ka != kb and "." not in ka
    assert photo_io.key_path(ka) is None  # source_path in the json keeps the path
    assert photo_io.path_key("b.c.jpg") == photo_io.path_key("b.c.png")  # ext is not in the key


# convert ---------------------------------------------------------------------------------------
def test_convert_folders_default_keeps_native_sizes_all_train(photos, tmp_path):
    out = tmp_path / "out"
    result = convert_imagefolder(str(photos), str(out))
    assert result["classes"] == ["cat", "dog"] and "test" not in result
    assert not (out / "test").exists() and result["train"]["samples"] == 4
    samples = {s.meta["source_path"]: s for s in _samples(out / "train")}
    assert sorted(samples) == ["cat/a.b.png", "cat/deep/x.jpg", "dog/d.png", "dog/e.png"]
    assert samples["cat/a.b.png"].image.shape == (10, 14, 3)
    assert samples["cat/deep/x.jpg"].image.shape == (20, 8, 3)
    assert {k: s.label for k, s in samples.items()} == {
        "cat/a.b.png": 0, "cat/deep/x.jpg": 0, "dog/d.png": 1, "dog/e.png": 1}
    for rel, s in samples.items():
        assert photo_io.key_path(s.key) == os.path.splitext(rel)[0]
    png = np.asarray(Image.open(photos / "dog" / "d.png"))
    assert np.array_equal(samples["dog/d.png"].image, png)  # lossless, untouched
    manifest = json.loads((out / "train" / "_dataset.json").read_text())
    assert manifest["image_shape"] is None and sum(manifest["image_shapes"].values()) == 4
    assert not [p for p in os.listdir(out) if p.startswith("_ue-convert-tmp-")]


def test_convert_labels_none_is_recursive_and_unlabelled(photos, tmp_path):
    _photo(photos / "top.png", 5, 5, 9)  # directly under PATH: ignored by --labels folders
    out = tmp_path / "out"
    convert_imagefolder(str(photos), str(out), labels="none", shard_size=2)
    samples = _samples(out / "train")
    assert len(samples) == 5 and len(list_shards(str(out / "train"))) == 3
    assert all(s.label is None for s in samples)
    assert sorted(s.meta["source_path"] for s in samples)[-1] == "top.png"
    import tarfile
    with tarfile.open(list_shards(str(out / "train"))[0]) as tar:
        assert not [n for n in tar.getnames() if n.endswith(".cls")]


def test_test_fraction_splits_seeded(photos, tmp_path):
    for i in range(6):
        _photo(photos / "dog" / f"more{i}.png", 7, 7, 20 + i)
    a = convert_imagefolder(str(photos), str(tmp_path / "a"), test_fraction=0.25, seed=3)
    b = convert_imagefolder(str(photos), str(tmp_path / "b"), test_fraction=0.25, seed=3)
    assert a["test"]["samples"] == 3 and a["train"]["samples"] == 7
    keys = lambda url: sorted(s.key for s in _samples(url))  # noqa: E731
    assert keys(tmp_path / "a" / "test") == keys(tmp_path / "b" / "test")
    assert not set(keys(tmp_path / "a" / "test")) & set(keys(tmp_path / "a" / "train"))


@pytest.mark.parametrize("mode,expected", [
    ("keep_ratio", {(10, 14): (8, 11), (20, 8): (20, 8), (12, 12): (8, 8), (6, 9): (8, 12)}),
    ("center_crop", {k: (8, 8) for k in [(10, 14), (20, 8), (12, 12), (6, 9)]}),
    ("border", {k: (8, 8) for k in [(10, 14), (20, 8), (12, 12), (6, 9)]}),
])
def test_resize_modes(photos, tmp_path, mode, expected):
    out = tmp_path / mode
    convert_imagefolder(str(photos), str(out), image_size=8, resize_mode=mode)
    native = {"cat/a.b.png": (10, 14), "cat/deep/x.jpg": (20, 8), "dog/d.png": (12, 12),
              "dog/e.png": (6, 9)}
    for s in _samples(out / "train"):
        assert s.image.shape[:2] == expected[native[s.meta["source_path"]]], s.meta
    if mode != "keep_ratio":
        assert load_imageset(str(out / "train")).image_shape == (3, 8, 8)


def test_border_pads_black_and_keeps_the_picture_centred():
    image = np.full((4, 8, 3), 200, np.uint8)
    out = photo_io.resize_image(image, "border", 8)
    assert out.shape == (8, 8, 3)
    assert (out[:2] == 0).all() and (out[6:] == 0).all() and (out[2:6] == 200).all()
    crop = photo_io.resize_image(np.arange(8 * 16, dtype=np.uint8).reshape(8, 16, 1), "center_crop", 8)
    assert crop.shape == (8, 8, 1) and crop[0, 0, 0] == 4  # columns 4..11 of the 8 x 16


def test_exif_rotated_jpeg_is_upright(tmp_path):
    # stored 10 wide x 4 high, tag 6 = "rotate 90 clockwise to view": upright it is 4 wide x 10 high
    image = np.zeros((4, 10, 3), np.uint8)
    image[:, :2] = 255  # the stored left edge: white
    exif = Image.Exif()
    exif[0x0112] = 6
    (tmp_path / "p").mkdir()
    Image.fromarray(image).save(tmp_path / "p" / "r.jpg", exif=exif.tobytes(), quality=100)
    convert_imagefolder(str(tmp_path / "p"), str(tmp_path / "out"), labels="none")
    (s,) = _samples(tmp_path / "out" / "train")
    assert s.image.shape == (10, 4, 3)
    assert s.image[:2].mean() > 200 and s.image[-2:].mean() < 50  # left edge became the top


def test_a_bad_file_midway_leaves_no_shards(photos, tmp_path):
    (photos / "dog" / "zz-broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "out"
    with pytest.raises(ConvertError, match=r"zz-broken.jpg is not a decodable image"):
        convert_imagefolder(str(photos), str(out), shard_size=1)  # 4 shards were staged first
    assert not (out / "train").exists()
    assert not out.exists() or _tree(out) == []


def test_16bit_and_clashing_keys_are_refused_naming_files(photos, tmp_path):
    Image.fromarray(np.full((4, 4), 40000, np.uint16)).save(photos / "dog" / "deep16.png")
    with pytest.raises(ConvertError, match=r"deep16.png is a 16-bit image"):
        convert_imagefolder(str(photos), str(tmp_path / "o1"))
    (photos / "dog" / "deep16.png").unlink()
    _photo(photos / "dog" / "d.jpg", 4, 4)
    with pytest.raises(ConvertError, match=r"dog/d.png.*dog/d.jpg|dog/d.jpg.*dog/d.png"):
        convert_imagefolder(str(photos), str(tmp_path / "o2"))
    assert not (tmp_path / "o2" / "train").exists()


def test_cli_convert_options_and_info_on_mixed_unlabelled(photos, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli(["convert", "imagefolder", str(photos), str(out), "--labels", "none"]) == 0
    assert "test:" not in capsys.readouterr().out
    assert cli(["info", str(out / "train")]) == 0
    text = capsys.readouterr().out
    assert "mixed, 4 sizes" in text and "4 without a label" in text
    info = dataset_info(str(out / "train"))
    assert info["image_shape"] is None and info["unlabelled"] == 4 and info["label_histogram"] == {}
    assert sorted(info["image_shapes"]) == ["10x14x3", "12x12x3", "20x8x3", "6x9x3"]
    with pytest.raises(ShardError, match="mixed image shapes.*--image-size"):
        load_imageset(str(out / "train"), require_labels=False)
    for argv, needle in [
        (["--resize-mode", "border"], "--resize-mode border needs --image-size"),
        (["--test-fraction", "1.5"], "--test-fraction must lie in [0, 1)"),
    ]:
        assert cli(["convert", "imagefolder", str(photos), str(tmp_path / "x"), *argv]) == 2
        assert needle in capsys.readouterr().err
    assert cli(["convert", "digits", str(tmp_path / "dg"), "--labels", "none"]) == 2
    assert "--labels applies to imagefolder only" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "dg").exists()


# export ----------------------------------------------------------------------------------------
def test_export_layout_manifest_and_refusals(photos, tmp_path, capsys):
    out = tmp_path / "out"
    convert_imagefolder(str(photos), str(out))
    # a caption passes through as an extra member
    shard = list_shards(str(out / "train"))[0]
    samples = read_shard(shard)
    samples[0].extra["txt"] = b"a caption"
    samples[0].meta.update(protected=True, method="em", eps=8 / 255)
    write_shard(str(tmp_path / "prot" / "shard-000000.tar"), samples)  # mixed sizes
    png_dir = tmp_path / "png"
    assert cli(["export", str(tmp_path / "prot"), str(png_dir)]) == 0
    assert _tree(png_dir) == ["cat/a.b.png", "cat/deep/x.png", "dog/d.png", "dog/e.png",
                              "ue-dist-export.json"]
    manifest = json.loads((png_dir / "ue-dist-export.json").read_text())
    entry = next(f for f in manifest["files"] if f["path"] == "cat/a.b.png")
    assert entry["protected"] and entry["method"] == "em" and entry["shard"] == "shard-000000.tar"
    import hashlib
    assert entry["sha256"] == hashlib.sha256((png_dir / "cat" / "a.b.png").read_bytes()).hexdigest()
    back = np.asarray(Image.open(png_dir / "cat" / "deep" / "x.png"))
    assert np.array_equal(back, next(s.image for s in samples if s.meta["source_path"] ==
                                     "cat/deep/x.jpg"))
    # non-empty without --overwrite; with --overwrite and --extras the caption lands beside
    assert cli(["export", str(tmp_path / "prot"), str(png_dir)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert cli(["export", str(tmp_path / "prot"), str(png_dir), "--overwrite", "--extras"]) == 0
    assert (png_dir / "cat" / "a.b.txt").read_bytes() == b"a caption"
    # a path escaping OUT_DIR is refused naming the sample; nothing is written
    evil = [Sample("ok", np.zeros((2, 2, 3), np.uint8), None, {"source_path": "fine.jpg"}),
            Sample("evil", np.zeros((2, 2, 3), np.uint8), None, {"source_path": "../escape.jpg"})]
    write_samples(str(tmp_path / "evil"), evil)
    assert cli(["export", str(tmp_path / "evil"), str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert "sample 'evil'" in err and "escape the output folder" in err
    assert not (tmp_path / "escape.png").exists() and not (tmp_path / "e").exists()
    evil[1].meta["source_path"] = "/abs/escape.jpg"
    with pytest.raises(photo_io.ExportError, match="'evil'"):
        photo_io.export(str(tmp_path / "evil"), str(tmp_path / "e2"))


def test_export_does_not_write_through_a_symlinked_folder(tmp_path):
    write_samples(str(tmp_path / "ds"), [Sample("k", np.zeros((2, 2, 3), np.uint8), None,
                                                {"source_path": "sub/k.jpg"})])
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "o").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "o" / "sub")
    with pytest.raises(photo_io.ExportError, match="symbolic link"):
        photo_io.export(str(tmp_path / "ds"), str(tmp_path / "o"), overwrite=True)
    assert os.listdir(tmp_path / "elsewhere") == []


# preview ---------------------------------------------------------------------------------------
def test_metrics_on_identical_and_known_perturbations():
    rng = np.random.default_rng(0)
    a = rng.integers(10, 240, (24, 20, 3), dtype=np.uint8)
    same = photo_io.image_metrics(a, a.copy())
    assert same["max_delta"] == 0 and math.isinf(same["psnr"]) and same["ssim"] == pytest.approx(1.0)
    delta = rng.choice(np.array([-4, 4]), a.shape)
    delta[3, 5, 1] = 7
    b = (a.astype(int) + delta).astype(np.uint8)
    m = photo_io.image_metrics(a, b)
    mse = np.mean(delta.astype(float) ** 2)
    assert m["max_delta"] == 7 and m["psnr"] == pytest.approx(10 * np.log10(255 ** 2 / mse))
    assert 0 < m["ssim"] < 1
    amp = photo_io.amplified(a, b)
    assert amp[3, 5, 1] == 255 and set(np.unique(amp[delta == 4])) == {round(128 + 4 * 127 / 7)}
    assert (photo_io.amplified(a, a) == 128).all()
    noisy = np.clip(a.astype(int) + rng.normal(0, 40, a.shape), 0, 255).astype(np.uint8)
    assert photo_io.ssim(a, noisy) < m["ssim"]  # more noise, less similar


def test_preview_grid_and_table(photos, tmp_path, capsys):
    out = tmp_path / "out"
    convert_imagefolder(str(photos), str(out), image_size=8, resize_mode="center_crop")
    samples = _samples(out / "train")
    for i, s in enumerate(samples):
        if i % 2:
            s.image = np.clip(s.image.astype(int) + 3, 0, 255).astype(np.uint8)
            s.meta["protected"] = True
    write_samples(str(tmp_path / "prot"), samples)
    grid = tmp_path / "grid.png"
    assert cli(["preview", str(out / "train"), str(tmp_path / "prot"), "--n", "3",
                "--out", str(grid), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [r["key"] for r in result["images"]] == [s.key for s in samples[:3]]
    assert math.isinf(result["images"][0]["psnr"]) and result["images"][1]["max_delta"] == 3
    with Image.open(grid) as g:
        assert g.size[0] == 3 * 160 + 16 and g.size[1] > 3 * 160
    assert cli(["preview", str(out / "train"), str(tmp_path / "prot"), "--n", "2"]) == 0
    table = capsys.readouterr().out
    assert "inf" in table and "SSIM" in table


def test_unicode_and_long_names_round_trip_through_convert_and_export(tmp_path):
    long_rel = "albums/" + "x" * 120 + ".final.jpg"
    for rel in ("été/photo 1.v2.png", long_rel):
        _photo(tmp_path / "in" / rel, 5, 7, len(rel))
    convert_imagefolder(str(tmp_path / "in"), str(tmp_path / "out"), labels="none")
    samples = _samples(tmp_path / "out" / "train")
    assert any(s.key.startswith("%%") and s.meta["source_path"] == long_rel for s in samples)
    photo_io.export(str(tmp_path / "out" / "train"), str(tmp_path / "png"))
    assert _tree(tmp_path / "png") == sorted(["albums/" + "x" * 120 + ".final.png",
                                              "été/photo 1.v2.png", "ue-dist-export.json"])


def test_overwrite_refuses_a_stale_test_split(photos, tmp_path):
    out = tmp_path / "out"
    for i in range(6):
        _photo(photos / "dog" / f"more{i}.png", 7, 7, 20 + i)
    convert_imagefolder(str(photos), str(out), test_fraction=0.3)
    with pytest.raises(Exception, match="earlier conversion.*no test split"):
        convert_imagefolder(str(photos), str(out), overwrite=True)
    assert len(_samples(out / "train")) == 7  # untouched
    convert_imagefolder(str(photos), str(tmp_path / "o2"), shard_size=1)
    assert len(list_shards(str(tmp_path / "o2" / "train"))) == 10
    convert_imagefolder(str(photos), str(tmp_path / "o2"), shard_size=100, overwrite=True)
    assert len(list_shards(str(tmp_path / "o2" / "train"))) == 1  # the 9 stale shards removed
    assert len(_samples(tmp_path / "o2" / "train")) == 10


def test_convert_to_and_export_from_an_s3_bucket(photos, tmp_path, s3_bucket):
    """Photos on disk -> shards in a bucket (moto's S3 API) -> files back, on disk and in the
    bucket: the same layout and pixels as the local round trip, no staging prefix left."""
    import s3fs

    out = f"{s3_bucket}/shards"
    convert_imagefolder(str(photos), out, labels="none")
    fs = s3fs.S3FileSystem()
    assert not [p for p in fs.find(out) if "_ue-convert-tmp-" in p]
    originals = {s.meta["source_path"]: s.image for s in _samples(f"{out}/train")}
    assert sorted(originals) == ["cat/a.b.png", "cat/deep/x.jpg", "dog/d.png", "dog/e.png"]
    local = tmp_path / "files"
    assert cli(["export", f"{out}/train", str(local)]) == 0
    assert _tree(local) == ["cat/a.b.png", "cat/deep/x.png", "dog/d.png", "dog/e.png",
                            "ue-dist-export.json"]
    for rel, image in originals.items():
        png = os.path.splitext(rel)[0] + ".png"
        assert np.array_equal(np.asarray(Image.open(local / png)), image), rel
    remote = f"{s3_bucket}/files"
    summary = photo_io.export(f"{out}/train", remote)
    assert summary["images"] == 4
    written = sorted(p[len(remote) - len("s3://"):].lstrip("/") for p in fs.find(remote))
    assert written == ["cat/a.b.png", "cat/deep/x.png", "dog/d.png", "dog/e.png",
                       "ue-dist-export.json"], written
    assert fs.cat(f"{remote}/dog/d.png") == (local / "dog" / "d.png").read_bytes()
