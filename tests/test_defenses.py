import pytest
import torch

from ue_dist.core.config import SettingsError
from ue_dist.core.defenses import (batch_augment, cutmix, cutout, defense_names, gaussian_filter,
                                   grayscale, jpeg, mean_filter, median_filter, mixup,
                                   parse_defense, preprocess)


def _smooth_images(n=4, c=3, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    base = torch.stack([(yy * a + xx * (1 - a)) for a in torch.rand(n * c, generator=g)])
    return base.view(n, c, size, size)


def test_mean_filter_of_constant_image_is_identity_and_it_smooths_noise():
    x = torch.full((2, 3, 16, 16), 0.37)
    assert torch.allclose(mean_filter(x), x, atol=1e-6)
    noise = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert mean_filter(noise).std() < 0.6 * noise.std()
    assert mean_filter(noise).mean() == pytest.approx(noise.mean().item(), abs=0.02)


def test_median_filter_removes_salt_and_pepper():
    clean = torch.full((1, 3, 16, 16), 0.5)
    noisy = clean.clone()
    g = torch.Generator().manual_seed(1)
    rows = torch.randint(1, 15, (12,), generator=g)
    cols = torch.randint(1, 15, (12,), generator=g)
    for i, (r, c) in enumerate(zip(rows, cols)):
        noisy[0, :, r, c] = float(i % 2)  # isolated impulses of 0 and 1
    assert (noisy != clean).any()
    restored = median_filter(noisy)
    assert torch.allclose(restored, clean)  # impulses gone entirely
    assert not torch.allclose(mean_filter(noisy), clean)  # the mean filter only spreads them


def test_gaussian_filter_preserves_constants_and_lowers_high_frequencies():
    x = torch.full((1, 1, 8, 8), 0.8)
    assert torch.allclose(gaussian_filter(x), x, atol=1e-6)
    checker = ((torch.arange(16).view(-1, 1) + torch.arange(16)) % 2).float().view(1, 1, 16, 16)
    out = gaussian_filter(checker)
    assert out.std() < 0.5 * checker.std()


def _impulse(size=5):
    x = torch.zeros(1, 1, size, size)
    x[0, 0, size // 2, size // 2] = 1.0
    return x


def test_gaussian_default_is_the_rem_authors_cv2_kernel():
    # cv2.GaussianBlur(x, (3, 3), 0) (REM's utils/generic.py) uses OpenCV's fixed [1, 2, 1] / 4
    # kernel: the impulse response is its outer product
    k = torch.tensor([0.25, 0.5, 0.25])
    out = gaussian_filter(_impulse())[0, 0, 1:4, 1:4]
    assert torch.allclose(out, torch.outer(k, k), atol=1e-7)
    assert parse_defense("gaussian").params == {"size": 3, "sigma": 0.0}
    # uint8 image and the output of cv2 5.0 GaussianBlur(img, (3, 3), 0) on it (border
    # BORDER_REFLECT_101); cv2 rounds in fixed point, so one pixel differs by 1
    img = torch.tensor([[217, 69, 19, 208, 128, 186], [143, 208, 100, 8, 216, 220],
                        [20, 108, 1, 171, 65, 98], [206, 175, 215, 99, 148, 134]], dtype=torch.uint8)
    cv2 = torch.tensor([[159, 129, 91, 112, 164, 188], [140, 121, 89, 102, 148, 169],
                        [124, 119, 105, 107, 124, 131], [127, 126, 123, 121, 116, 111]])
    ours = preprocess("gaussian", img.view(1, 1, 4, 6))[0, 0].long()
    assert (ours - cv2).abs().max() <= 1 and (ours == cv2).sum() >= 23


def test_gaussian_sigma_08_matches_the_hand_computed_kernel():
    # sigma = 0.3 * ((3 - 1) * 0.5 - 1) + 0.8 = 0.8: taps exp(-1 / (2 * 0.64)) = 0.45783 and 1,
    # normalised by 1 + 2 * 0.45783
    side = 0.45783336 / (1 + 2 * 0.45783336)
    k = torch.tensor([side, 1 - 2 * side, side])
    assert abs(side - 0.238994) < 1e-5
    out = gaussian_filter(_impulse(), sigma=0.8)[0, 0, 1:4, 1:4]
    assert torch.allclose(out, torch.outer(k, k), atol=1e-6)
    assert out.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert parse_defense("gaussian:sigma=0.8").params["sigma"] == 0.8
    with pytest.raises(SettingsError, match="sigma must be >= 0"):
        parse_defense("gaussian:sigma=-1")


def test_grayscale_channels_equal_and_luminance():
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    g = grayscale(x)
    assert g.shape == x.shape
    assert torch.allclose(g[:, 0], g[:, 1]) and torch.allclose(g[:, 1], g[:, 2])
    lum = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    assert torch.allclose(g[:, 0], lum, atol=1e-5)


def test_jpeg_changes_the_image_but_keeps_it_close():
    x8 = (_smooth_images() * 255).round().to(torch.uint8)
    x8 = x8 + (torch.rand(x8.shape, generator=torch.Generator().manual_seed(3)) * 8).to(torch.uint8)
    out = jpeg(x8, quality=30)
    assert out.dtype == torch.uint8 and out.shape == x8.shape
    diff = (out.float() - x8.float()).abs()
    assert diff.max() > 0
    assert diff.mean() < 8  # close: a few grey levels on average
    # lower quality removes more
    assert (jpeg(x8, quality=5).float() - x8.float()).abs().mean() > diff.mean()


def test_preprocess_uint8_and_passthrough():
    x8 = (torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(4)) * 255).to(torch.uint8)
    for name in ("mean", "median", "gaussian", "grayscale", "jpeg"):
        out = preprocess(name, x8)
        assert out.dtype == torch.uint8 and out.shape == x8.shape and not torch.equal(out, x8)
    for name in ("none", "mixup", "cutout", "cutmix"):
        assert torch.equal(preprocess(name, x8), x8)


def test_mixup_targets_are_convex_combinations():
    g = torch.Generator().manual_seed(5)
    x = torch.rand(16, 3, 8, 8, generator=g)
    y = torch.nn.functional.one_hot(torch.arange(16) % 4, 4).float()
    xm, ym = mixup(x, y, alpha=1.0, generator=g)
    assert torch.allclose(ym.sum(1), torch.ones(16))
    assert (ym >= 0).all() and (ym <= 1).all()
    # the image and the label are mixed with the same weight: recover lambda from one sample pair
    lam = ym.max(1).values.min()
    assert 0 <= lam <= 1
    assert not torch.equal(xm, x)
    assert xm.min() >= 0 and xm.max() <= 1


def test_cutmix_label_weight_matches_pasted_area():
    g = torch.Generator().manual_seed(6)
    x = torch.zeros(8, 1, 16, 16)
    x += torch.arange(8).view(8, 1, 1, 1).float()  # image i is constant i
    y = torch.nn.functional.one_hot(torch.arange(8), 8).float()
    xm, ym = cutmix(x, y, alpha=1.0, generator=g)
    own = (xm == x).float().mean(dim=(1, 2, 3))  # fraction of each image still its own
    assert torch.allclose(ym[torch.arange(8), torch.arange(8)], own, atol=1e-6)
    assert torch.allclose(ym.sum(1), torch.ones(8))


def test_cutout_zeroes_one_square_and_keeps_labels():
    g = torch.Generator().manual_seed(7)
    x = torch.ones(6, 3, 32, 32)
    y = torch.eye(6)
    xc, yc = cutout(x, y, size=8, generator=g)
    assert torch.equal(yc, y)
    zeros = (xc == 0).all(dim=1).float().sum(dim=(1, 2))
    assert (zeros > 0).all() and (zeros <= 64).all()  # at most the 8x8 square, clipped at borders
    assert (xc == 0).any(dim=1).equal((xc == 0).all(dim=1))  # same square in every channel


def test_parse_defense_params_and_errors():
    assert parse_defense("jpeg:quality=30").params == {"quality": 30}
    assert parse_defense("jpeg:quality=30").spec == "jpeg:quality=30"
    assert parse_defense(None).name == "none"
    with pytest.raises(SettingsError, match="valid: .*cutmix.*median"):
        parse_defense("blur")
    with pytest.raises(SettingsError, match="valid keys: quality"):
        parse_defense("jpeg:q=30")
    with pytest.raises(SettingsError, match="quality"):
        parse_defense("jpeg:quality=0")
    assert "grayscale" in defense_names()
    x = torch.rand(2, 3, 8, 8)
    t = torch.eye(2)
    assert batch_augment("median", x, t)[0] is x
