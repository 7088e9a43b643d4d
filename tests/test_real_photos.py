"""Real photographs end to end: scikit-learn's two JPEG photos (china.jpg, flower.jpg, 427x640)
in an img2dataset-style shard (jpg + txt + json, mixed sizes, no labels, one EXIF-rotated copy)
protected at native size with GUE and EM (tiny settings) through ``ue_dist.runtime.protect``;
the bound checked pixel by pixel in the written PNGs, captions and fields unchanged, and the
protected photos exported back to files."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from ue_dist.core.context import LocalContext
from ue_dist.core.quantize import pixel_budget
from ue_dist.data.imageset import ImageSet
from ue_dist.data.photo_io import export
from ue_dist.data.shards import read_shard
from ue_dist.data.sources import sample_photos
from ue_dist.methods.base import build_method, save_state
from ue_dist.runtime.protect import protect

GUE_TINY = {"width": 4, "epochs": 1, "batch_size": 16, "inner_steps": 1, "select_every": 0,
            "val_fraction": 0.0, "log_every": 1}
EM_TINY = {"train_steps": 4, "log_every": 2, "checkpoint_every": 0, "stop_acc": 0.0,
           "steps_u": 2}
ORIENTATION = 0x0112


def _jpeg(img: Image.Image, exif: Image.Exif | None = None) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92, **({"exif": exif} if exif is not None else {}))
    return buf.getvalue()


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    """SRC with one shard of four real photos: both originals, a 213x320 copy of the flower and
    the china photo stored rotated with EXIF orientation 6 (a camera held upright)."""
    root = tmp_path_factory.mktemp("photos")
    photos = sample_photos()
    china = Image.open(io.BytesIO(photos["china.jpg"])).convert("RGB")
    flower = Image.open(io.BytesIO(photos["flower.jpg"])).convert("RGB")
    exif = Image.Exif()
    exif[ORIENTATION] = 6  # displayed = stored rotated 90 degrees clockwise
    members = {
        "000000000": (photos["china.jpg"], "a pagoda in china"),
        "000000001": (photos["flower.jpg"], "a flower, \u00e9t\u00e9"),
        "000000002": (_jpeg(flower.resize((320, 213), Image.LANCZOS)), "the flower, smaller"),
        "000000003": (_jpeg(china.transpose(Image.Transpose.ROTATE_90), exif),
                      "china, rotated by its camera"),
    }
    src = root / "src"
    src.mkdir()
    with tarfile.open(src / "00000.tar", "w") as tar:
        for key, (jpg, caption) in members.items():
            for ext, payload in (("jpg", jpg), ("txt", caption.encode()),
                                 ("json", json.dumps({"key": key, "status": "success"}).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    upright = {k: np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(v[0]))).convert("RGB"))
               for k, v in members.items()}
    return {"root": root, "src": str(src), "upright": upright,
            "captions": {k: v[1] for k, v in members.items()}, "china": china, "flower": flower}


def _crops(bucket, n=64, size=32, seed=0):
    """32x32 crops of the two photos, labelled by photo: what the tiny states are fitted on."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i in range(n):
        photo = np.asarray(bucket["china"] if i % 2 == 0 else bucket["flower"])
        top, left = rng.integers(0, photo.shape[0] - size), rng.integers(0, photo.shape[1] - size)
        images.append(photo[top:top + size, left:left + size])
        labels.append(i % 2)
    return ImageSet.from_numpy_hwc(np.stack(images), np.array(labels), num_classes=2)


def _check_output(bucket, dst, method, eps):
    out = {s.key: s for s in read_shard(f"{dst}/00000.tar")}
    assert sorted(out) == sorted(bucket["upright"])
    budget = pixel_budget(eps)
    for key, original in bucket["upright"].items():
        s = out[key]
        assert s.image.shape == original.shape  # native size; the rotated one upright
        diff = np.abs(s.image.astype(int) - original.astype(int))
        assert diff.max() <= budget, (key, diff.max())
        assert (diff > 0).mean() > 0.3, key  # protected across the photo
        assert s.extra == {"txt": bucket["captions"][key].encode()}
        assert s.meta["status"] == "success" and s.meta["protected"] and s.meta["method"] == method
    # the written image members are PNG without an orientation tag: read as stored, upright
    with tarfile.open(f"{dst}/00000.tar") as tar:
        png = Image.open(io.BytesIO(tar.extractfile("000000003.png").read()))
        assert png.format == "PNG" and png.getexif().get(ORIENTATION) in (None, 1)
        assert (png.height, png.width) == bucket["upright"]["000000003"].shape[:2]


def _fit(bucket, name: str, overrides: dict):
    """Fit ``name`` on the photos' crops; returns the method and its state's path."""
    state = str(bucket["root"] / f"{name}.pt")
    torch.manual_seed(0)
    method = build_method(name, "quick", overrides)
    save_state(method.fit(_crops(bucket), LocalContext(device="cpu", log=lambda m: None)), state)
    return method, state


def test_gue_protects_real_photos_at_native_size(ray_local, bucket):
    method, state = _fit(bucket, "gue", GUE_TINY)
    dst = str(bucket["root"] / "gue-out")
    summary = protect("gue", bucket["src"], dst, state_url=state, actors=1,
                      cpus_per_actor=0.5, progress=None)
    assert summary["ok"] and summary["images_protected"] == 4, summary
    _check_output(bucket, dst, "gue", method.eps)
    # and back out as files: img2dataset's samples carry no source path, so each is KEY.png
    out_dir = bucket["root"] / "gue-files"
    export(dst, str(out_dir), extras=True)
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(
        [f"{k}.png" for k in bucket["upright"]] + [f"{k}.txt" for k in bucket["upright"]]
        + ["ue-dist-export.json"])
    manifest = json.loads((out_dir / "ue-dist-export.json").read_text())
    budget = pixel_budget(method.eps)
    for key, original in bucket["upright"].items():
        written = np.asarray(Image.open(out_dir / f"{key}.png"))
        assert written.shape == original.shape
        assert np.abs(written.astype(int) - original.astype(int)).max() <= budget
        assert (out_dir / f"{key}.txt").read_text() == bucket["captions"][key]
    assert manifest["images"] == manifest["protected"] == 4, manifest
    assert {f["method"] for f in manifest["files"] if f["member"] == "image"} == {"gue"}


def test_em_protects_unlabelled_real_photos_with_predicted_labels(ray_local, bucket):
    method, state = _fit(bucket, "em", EM_TINY)
    dst = str(bucket["root"] / "em-out")
    # unlabelled photos need a label source: without one the shard is bad, naming the sample
    refused = protect("em", bucket["src"], str(bucket["root"] / "em-refused"), state_url=state,
                      actors=1, cpus_per_actor=0.5, progress=None)
    assert not refused["ok"] and refused["images_protected"] == 0
    assert "sample '000000000': no label" in refused["bad_shards"][0]["reason"]
    summary = protect("em", bucket["src"], dst, state_url=state, labels="predict", actors=1,
                      cpus_per_actor=0.5, progress=None)
    assert summary["ok"] and summary["images_protected"] == 4, summary
    _check_output(bucket, dst, "em", method.eps)
