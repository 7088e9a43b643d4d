"""Shards as photo buckets and img2dataset write them: any image format, no labels, mixed sizes,
EXIF orientation, and every other member passed through unchanged."""
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from ue_dist.data.shards import Sample, ShardError, decode_image, parse_shard, shard_bytes


def _encoded(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _tar(members):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def _photo(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_img2dataset_shard_reads_without_labels_with_mixed_sizes_and_keeps_members():
    caption = "a red fox, \u00e9t\u00e9 \u2014 caption".encode()
    info = json.dumps({"url": "http://x/y.jpg", "width": 7, "status": "success"}).encode()
    data = _tar([("000000000.jpg", _encoded(Image.fromarray(_photo(5, 7)), "JPEG", quality=95)),
                 ("000000000.txt", caption), ("000000000.json", info),
                 ("000000001.webp", _encoded(Image.fromarray(_photo(9, 4, 1)), "WEBP",
                                             lossless=True)),
                 ("000000001.TXT", b"upper-case extension")])
    first, second = parse_shard(data, "i2d.tar")
    assert first.label is None and first.image.shape == (5, 7, 3)
    assert first.extra == {"txt": caption} and first.meta["url"] == "http://x/y.jpg"
    assert np.array_equal(second.image, _photo(9, 4, 1))  # lossless WebP: exact pixels
    assert second.extra == {"TXT": b"upper-case extension"}
    # written back: PNG image, no .cls invented, the other members byte for byte
    out = shard_bytes([first, second])
    with tarfile.open(fileobj=io.BytesIO(out)) as tar:
        names = [m.name for m in tar]
        assert names == ["000000000.png", "000000000.json", "000000000.txt",
                         "000000001.png", "000000001.json", "000000001.TXT"]
        assert tar.extractfile("000000000.txt").read() == caption
    again = parse_shard(out, "out.tar")
    assert [s.extra for s in again] == [first.extra, second.extra]
    assert np.array_equal(again[0].image, first.image) and again[0].label is None


def test_exif_orientation_applied_once():
    img = _photo(4, 6)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    stored = _encoded(Image.fromarray(img), "PNG", exif=exif)
    upright = decode_image(stored)
    assert upright.shape == (6, 4, 3)
    assert np.array_equal(upright, np.rot90(img, k=-1))
    # the PNG we write has no orientation tag: reading it back does not rotate it again
    again = parse_shard(shard_bytes([Sample("a", upright, None)]), "x.tar")[0].image
    assert np.array_equal(again, upright)


@pytest.mark.parametrize("mode,channels", [("L", 1), ("1", 1), ("RGB", 3), ("CMYK", 3),
                                           ("P", 3), ("RGBA", 4), ("LA", 4)])
def test_modes_follow_one_rule(mode, channels):
    img = Image.fromarray(_photo(3, 5)).convert(mode)
    fmt = "TIFF" if mode == "CMYK" else "PNG"
    assert decode_image(_encoded(img, fmt)).shape == (3, 5, channels)


def test_bmp_and_tiff_read():
    img = _photo(6, 3, 2)
    for fmt in ("BMP", "TIFF"):
        assert np.array_equal(decode_image(_encoded(Image.fromarray(img), fmt)), img)


def test_sixteen_bit_refused_naming_the_sample():
    deep = Image.fromarray(np.full((4, 4), 40000, np.uint16))
    with pytest.raises(ShardError, match=r"sample 'a'.*16-bit"):
        parse_shard(_tar([("a.png", _encoded(deep, "PNG"))]), "deep.tar")


def test_extra_member_cannot_clash_with_own_members():
    with pytest.raises(ShardError, match="clash"):
        shard_bytes([Sample("a", _photo(2, 2), 1, {}, {"cls": b"3"})])
