"""Protection at native resolution: tiles of the fitted size, the channel rule, size buckets.

``methods.protect.protect_native`` is what ``pipeline.protect_samples`` runs on every shard; these
tests run it directly on tensors, then once through ``protect_shard`` on a mixed-size shard.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import fit_classwise
from ue_dist.core.quantize import pixel_budget
from ue_dist.data.shards import Sample, read_shard, write_shard
from ue_dist.methods.base import build_method, get_method, load_state
from ue_dist.methods.protect import (MAX_BATCH_PIXELS, native_problem, protect_native,
                                     protect_uint8, tile_origins)


def _photo(h, w, c=3, seed=0):
    """A smooth image (gradients plus a little noise) in 20..240, uint8 C x H x W: a change of
    8 levels is never clipped."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    base = torch.stack([(yy + xx) / 2, yy, xx, torch.ones_like(yy)][:c])
    return (20 + base * 180 + torch.rand((c, h, w), generator=g) * 40).round().clamp(0, 255).to(
        torch.uint8)


@pytest.fixture(scope="module")
def classwise(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("cw") / "cw.pt")
    fit_classwise(url, image_size=32)
    state = load_state(url)
    method = get_method("classwise").for_state(state)
    return method, state, method.load(state)


def test_tile_origins_cover_every_pixel_once_aligned_to_the_far_edge():
    for size, tile in [(32, 32), (33, 32), (64, 32), (100, 32), (7, 32), (4000, 224)]:
        starts = tile_origins(size, tile)
        assert starts[0] == 0 and starts == sorted(set(starts))
        covered = np.zeros(max(size, tile), dtype=int)
        for s in starts:
            covered[s:s + tile] += 1
        assert covered[:size].min() >= 1  # every pixel in some tile
        assert starts[-1] == max(0, size - tile)  # the last tile ends at the edge, not past it
        assert all(b - a == tile for a, b in zip(starts[:-2], starts[1:-1]))


def test_fitted_size_images_give_protect_uint8_bytes(classwise):
    """An image of the fitted size is one tile: a uniform set gets exactly the old batches."""
    method, state, loaded = classwise
    x = torch.stack([_photo(32, 32, seed=i) for i in range(10)])
    y = torch.arange(10) % 10
    old = protect_uint8(method, loaded, x, y, batch_size=4)
    new = protect_native(method, loaded, list(x), y, state, batch_size=4)
    assert torch.equal(torch.stack(new), old)


def test_any_size_is_tiled_by_the_fitted_size(classwise):
    """Class-wise noise makes the tiling visible: every tile of an image of class k carries
    pattern k, the last row and column of tiles aligned to the image's far edges."""
    method, state, loaded = classwise
    budget = pixel_budget(method.eps)
    sizes = [(70, 50), (32, 96), (20, 10), (1, 300), (129, 33)]
    images = [_photo(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    labels = torch.tensor([3, 1, 4, 1, 5])
    out = protect_native(method, loaded, images, labels, state, batch_size=7)
    for x, o, (h, w), k in zip(images, out, sizes, labels.tolist()):
        assert o.shape == x.shape and o.dtype == torch.uint8
        d = o.int() - x.int()
        assert int(d.abs().max()) <= budget and int(d.abs().max()) > 0
        assert (d != 0).float().mean() > 0.5  # perturbed everywhere, not only in one tile
        if h >= 32 and w >= 32:
            # class k's pattern, as a 32 x 32 image gets it (the photos stay inside 0..255)
            one = _photo(32, 32, seed=99)
            ref = protect_native(method, loaded, [one], torch.tensor([k]), state)[0].int() - one.int()
            assert torch.equal(d[:, h - 32:, w - 32:], ref)  # the last tile, edge-aligned
            rows, cols = tile_origins(h, 32)[1:2] or [32], tile_origins(w, 32)[1:2] or [32]
            # the first tile where no later tile overlaps it
            assert torch.equal(d[:, :rows[0], :cols[0]], ref[:, :rows[0], :cols[0]])


def test_channel_rule_alpha_kept_grey_made_colour(classwise):
    method, state, loaded = classwise
    rgba, grey = _photo(40, 40, c=4, seed=1), _photo(45, 33, c=1, seed=2)
    out = protect_native(method, loaded, [rgba, grey], torch.tensor([0, 2]), state)
    assert out[0].shape == (4, 40, 40) and torch.equal(out[0][3], rgba[3])  # alpha untouched
    assert int((out[0][:3].int() - rgba[:3].int()).abs().max()) == pixel_budget(method.eps)
    assert out[1].shape == (3, 45, 33)  # a grey photo protected by a colour state is colour
    for ch in range(3):
        assert int((out[1][ch].int() - grey[0].int()).abs().max()) <= pixel_budget(method.eps)
    assert native_problem(method, state, (4, 40, 40)) is None
    assert native_problem(method, state, (1, 9, 9)) is None


def test_refusals_name_the_reason():
    """A grey state refuses colour; an L2 or L0 method protects its fitted size only."""
    lsp = build_method("lsp", "quick")
    fake = {"image_shape": [1, 32, 32]}
    assert "fitted on grey images" in native_problem(lsp, fake, (3, 32, 32))
    assert native_problem(lsp, {"image_shape": [3, 32, 32]}, (3, 32, 32)) is None
    problem = native_problem(lsp, {"image_shape": [3, 32, 32]}, (3, 64, 48))
    assert "L2 norm of a whole image" in problem and "64x48" in problem
    ops = build_method("ops", "paper")
    assert "L0" in native_problem(ops, {"image_shape": [3, 32, 32]}, (3, 33, 32))


def test_without_a_fitted_size_whole_images_in_size_buckets():
    """random-samplewise learns nothing: each image is perturbed whole at its own size, a
    batch never holds more than MAX_BATCH_PIXELS (a photo above it is a batch of its own), and
    the noise of an image does not depend on its batch."""
    method = build_method("random-samplewise", "paper")
    seen = []
    perturb = method.perturb

    def spy(loaded, images, labels):
        seen.append(tuple(images.shape))
        return perturb(loaded, images, labels)

    method.perturb = spy
    big = _photo(2100, 2100, seed=9)  # 4.4 Mpx > MAX_BATCH_PIXELS
    images = [_photo(32, 48, seed=0), big, _photo(32, 48, seed=1), _photo(100, 20, c=4, seed=2)]
    out = protect_native(method, None, images, torch.full((4,), -1), None, batch_size=256)
    assert sorted(seen) == sorted([(2, 3, 32, 48), (1, 3, 2100, 2100), (1, 3, 100, 20)])
    assert all(s[0] * s[2] * s[3] <= MAX_BATCH_PIXELS or s[0] == 1 for s in seen)
    alone = protect_native(method, None, [images[2]], torch.full((1,), -1), None)
    assert torch.equal(alone[0], out[2])
    assert torch.equal(out[3][3], images[3][3])
    assert all(int((o[:3].int() - x[:3].int()).abs().max()) <= 8 for o, x in zip(out, images))


def test_a_12_megapixel_photo_in_tiles(classwise):
    """4000 x 3000 RGB: 11,750 tiles of 32 x 32 in batches of 256; the bound holds in every
    pixel and every tile is perturbed."""
    method, state, loaded = classwise
    x = _photo(3000, 4000, seed=4)
    out = protect_native(method, loaded, [x], torch.tensor([7]), state, batch_size=256)[0]
    d = (out.int() - x.int()).abs()
    assert int(d.max()) <= pixel_budget(method.eps)
    per_tile = d.amax(dim=0)[: 2976, : 3968].reshape(93, 32, 124, 32).amax(dim=(1, 3))
    assert int((per_tile == 0).sum()) == 0


def test_mixed_size_shard_through_the_pipeline(tmp_path, classwise):
    """protect_shard on a shard of mixed sizes and modes, labels given: every image keeps its
    size, the bound holds in the written PNGs, captions pass through."""
    from ue_dist.pipeline import open_config, protect_shard

    method, state, _ = classwise
    state_url = str(tmp_path / "cw.pt")
    fit_classwise(state_url, image_size=32)
    src = str(tmp_path / "src" / "shard-000000.tar")
    shapes = [(300, 200, 3), (32, 32, 3), (17, 90, 1), (64, 64, 4)]
    samples = [Sample(f"p{i}", _photo(h, w, c, seed=i).permute(1, 2, 0).numpy().copy(), i % 10,
                      {}, extra={"txt": f"caption {i}".encode()})
               for i, (h, w, c) in enumerate(shapes)]
    write_shard(src, samples)
    config = open_config(method, state_url, batch_size=16)
    result = protect_shard(config, src, str(tmp_path / "dst"))
    assert result["ok"] and result["protected"] == 4, result
    out = {s.key: s for s in read_shard(str(tmp_path / "dst" / "shard-000000.tar"))}
    for s in samples:
        o = out[s.key]
        want = s.image.shape if s.image.shape[2] != 1 else (*s.image.shape[:2], 3)
        assert o.image.shape == want and o.extra["txt"] == s.extra["txt"]
        diff = np.abs(o.image[..., :3].astype(int) - s.image[..., :3].astype(int))
        assert 0 < diff.max() <= pixel_budget(method.eps)
        assert o.meta["protected"] and o.meta["method"] == "classwise"
