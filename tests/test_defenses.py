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
    for name in ("mean", "median", "gaussian", "grayscale", "jpeg", "bdr"):
        out = preprocess(name, x8)
        assert out.dtype == torch.uint8 and out.shape == x8.shape and not torch.equal(out, x8)
    for name in ("none", "mixup", "cutout", "cutmix", "noise", "ueraser-max", "ueraser-lite"):
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


# --- bit-depth reduction (ISS / APBench) ----------------------------------------------------------
def test_bdr_keeps_the_top_bits_as_torchvision_posterize():
    from torchvision.transforms.functional import posterize

    from ue_dist.core.defenses import bdr
    x8 = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).repeat(2, 3, 1, 1)
    for bits in range(1, 9):
        out = preprocess(f"bdr:bits={bits}", x8)
        # the formula of ISS / APBench (transforms.RandomPosterize(bits, p=1) on uint8 images):
        # floor(x / 2^(8-b)) * 2^(8-b), not round(x (2^b - 1)) / (2^b - 1)
        step = 2 ** (8 - bits)
        assert torch.equal(out, (x8 // step) * step)
        assert torch.equal(out, posterize(x8, bits))
        assert torch.equal(bdr(x8, bits), out)
        for c in range(3):
            assert len(out[:, c].unique()) <= 2 ** bits
    assert torch.equal(preprocess("bdr:bits=8", x8), x8)
    assert preprocess("bdr", x8).unique().tolist() == [0, 64, 128, 192]  # default 2 bits
    assert parse_defense("bdr").params == {"bits": 2}
    with pytest.raises(SettingsError, match="bits must lie in"):
        parse_defense("bdr:bits=0")


# --- random noise ------------------------------------------------------------------------------
def test_uniform_noise_is_bounded_by_eps_and_fills_the_ball():
    from ue_dist.core.defenses import noise
    x = torch.full((64, 3, 8, 8), 0.5)
    t = torch.eye(64)
    g = torch.Generator().manual_seed(0)
    out, tt = batch_augment("noise:eps=8/255", x, t, generator=g)
    assert tt is t and out.shape == x.shape
    d = out - x
    assert d.abs().max() <= 8 / 255 + 1e-6
    assert d.abs().max() > 0.99 * 8 / 255 and abs(d.mean().item()) < 2e-4  # uniform on [-e, e]
    assert d.std().item() == pytest.approx(8 / 255 / 3 ** 0.5, rel=0.02)
    # fresh each batch, and a function of the generator
    again, _ = noise(x, t, eps=8 / 255, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, out)
    assert not torch.equal(noise(x, t, generator=g)[0], out)
    # clipped to [0, 1]
    edge, _ = noise(torch.ones(4, 1, 8, 8), torch.eye(4), eps=0.1, generator=g)
    assert edge.max() <= 1 and edge.min() >= 0.9


def test_gaussian_noise_has_standard_deviation_eps():
    x = torch.full((64, 3, 16, 16), 0.5)
    out, _ = batch_augment("noise:eps=4/255,dist=gaussian", x, torch.eye(64),
                           generator=torch.Generator().manual_seed(1))
    d = out - x
    assert d.std().item() == pytest.approx(4 / 255, rel=0.02)
    assert d.abs().max() > 3 * 4 / 255  # unbounded tails, unlike uniform
    with pytest.raises(SettingsError, match="dist must be one of uniform, gaussian"):
        parse_defense("noise:dist=laplace")
    with pytest.raises(SettingsError, match="eps must lie in"):
        parse_defense("noise:eps=2")
    assert parse_defense("noise:eps=8/255").params["eps"] == pytest.approx(8 / 255)


# --- UEraser -------------------------------------------------------------------------------------
class _Stub(torch.nn.Module):
    """logits = w * (mean pixel of the image, per class offset): per-sample losses depend on the
    view, and w gets a gradient."""

    def __init__(self, classes=3):
        super().__init__()
        self.w = torch.nn.Parameter(torch.linspace(-1, 1, classes))

    def forward(self, x):
        return x.mean(dim=(1, 2, 3))[:, None] * self.w[None] * 10


def _known_views(scales):
    """An 'augmentation' whose k-th call scales the batch by scales[k] (known draws)."""
    calls = []

    def augment(x, generator):
        calls.append(len(calls))
        return x * scales[len(calls) - 1]

    return augment, calls


def test_ueraser_max_loss_is_the_mean_of_the_per_sample_maximum_over_its_draws():
    from ue_dist.core.defenses import UEraserLoss
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 4, 4, generator=g)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    scales = [0.2, 1.0, 0.5, 0.9, 0.1]
    augment, calls = _known_views(scales)
    net = _Stub()
    loss, logits = UEraserLoss(repeat=5, epochs=0, augment=augment)(net, x, y, g, epoch=7)
    assert len(calls) == 5
    per_view = torch.stack([torch.nn.functional.cross_entropy(net(x * s), y, reduction="none")
                            for s in scales])
    expect = per_view.max(0).values.mean()
    assert loss.item() == pytest.approx(expect.item(), rel=1e-6)
    assert loss.item() > per_view.mean().item()  # the max, not the average, of the views
    # different samples take their maximum from different views here
    assert len(set(per_view.argmax(0).tolist())) > 1
    assert torch.allclose(logits, net(x * scales[-1]))  # the last view feeds the meter
    loss.backward()
    assert net.w.grad is not None and net.w.grad.abs().sum() > 0


def test_ueraser_takes_the_max_for_its_first_epochs_then_one_draw_and_lite_one():
    from ue_dist.core.defenses import UEraserLoss, defense_loss
    x, y = torch.rand(4, 1, 4, 4), torch.tensor([0, 1, 2, 0])
    g = torch.Generator().manual_seed(0)
    for epoch, views in ((0, 3), (1, 3), (2, 1), (9, 1)):
        augment, calls = _known_views([1.0] * 3)
        UEraserLoss(repeat=3, epochs=2, augment=augment)(_Stub(), x, y, g, epoch=epoch)
        assert len(calls) == views, epoch
    assert defense_loss("ueraser:max:repeat=4").views(1000) == 4  # max: every epoch
    assert defense_loss("ueraser").views(49) == 5 and defense_loss("ueraser").views(50) == 1
    lite = defense_loss("ueraser:lite")
    assert lite.views(0) == 1
    augment, calls = _known_views([0.5])
    lite._augment = augment
    loss, _ = lite(_Stub(), x, y, g, epoch=0)
    assert len(calls) == 1
    net = _Stub()
    assert loss.item() == pytest.approx(torch.nn.functional.cross_entropy(net(x * 0.5), y).item())


@pytest.mark.parametrize("channels", [1, 3])
def test_ueraser_augmentation_keeps_shapes_and_range_and_is_seeded(channels):
    from ue_dist.core.defenses import defense_loss
    owner = defense_loss("ueraser-max:repeat=2")
    x = torch.rand(8, channels, 16, 16, generator=torch.Generator().manual_seed(3))
    state = torch.random.get_rng_state()
    outs = []
    for seed in range(12):  # TrivialAugment picks one op per call: try many
        out = owner.augment(x, torch.Generator().manual_seed(seed))
        assert out.shape == x.shape and out.dtype == x.dtype
        assert out.min() >= 0 and out.max() <= 1
        outs.append(out)
    assert not all(torch.equal(o, x) for o in outs)
    # a function of the generator only; torch's global generator untouched
    assert torch.equal(owner.augment(x, torch.Generator().manual_seed(5)), outs[5])
    assert torch.equal(torch.random.get_rng_state(), state)
    net = _Stub()
    loss, logits = owner(net, x, torch.arange(8) % 3, torch.Generator().manual_seed(0), epoch=0)
    assert logits.shape == (8, 3) and torch.isfinite(loss)
    loss.backward()
    assert net.w.grad.abs().sum() > 0


def test_ueraser_pipeline_is_the_authors():
    import kornia.augmentation as K

    from ue_dist.core.defenses import ueraser_pipeline
    ops = list(ueraser_pipeline(3).children())
    assert [type(o).__name__ for o in ops] == ["RandomPlasmaBrightness", "RandomPlasmaContrast",
                                               "RandomChannelShuffle", "TrivialAugment"]
    assert ops[0].p == 1.0 and ops[1].p == 1.0 and ops[2].p == 0.5
    assert isinstance(ops[3], K.auto.TrivialAugment)
    assert [type(o).__name__ for o in ueraser_pipeline(1, 0.5).children()] == [
        "RandomPlasmaBrightness", "RandomPlasmaContrast", "TrivialAugment"]  # 1 channel


def test_modes_and_names_of_ueraser():
    assert parse_defense("ueraser:max:repeat=5").name == "ueraser-max"
    assert parse_defense("ueraser:max:repeat=5").params == parse_defense("ueraser-max").params
    assert parse_defense("ueraser:max:repeat=3") == parse_defense("ueraser-max:repeat=3")
    assert parse_defense("ueraser:lite").spec == "ueraser-lite"
    assert parse_defense("ueraser:epochs=20").params == {"repeat": 5, "epochs": 20,
                                                         "plasma_p": 1.0}
    assert parse_defense("ueraser-max").kind == "loss"
    with pytest.raises(SettingsError, match="unknown mode 'fast'; valid modes: lite, max"):
        parse_defense("ueraser:fast")
    with pytest.raises(SettingsError, match="valid keys: plasma_p"):
        parse_defense("ueraser:lite:repeat=5")  # Lite is one draw
    with pytest.raises(SettingsError, match="repeat must be >= 1"):
        parse_defense("ueraser:max:repeat=0")
    with pytest.raises(SettingsError, match="bad parameter '30'"):
        parse_defense("jpeg:30")  # no modes: still a parameter error
    with pytest.raises(SettingsError, match="victim setting.*--adv-norm"):
        parse_defense("pgd-at")


def test_every_defence_has_a_paper_and_valid_defaults():
    from ue_dist.core.defenses import DEFENSES, listing
    for name, entry in DEFENSES.items():
        assert entry.paper and entry.kind in ("none", "pre", "batch", "loss"), name
        if name == "avatar":  # its checkpoint has no default
            assert parse_defense("avatar:model=/m.pt").params == {**entry.params, "model": "/m.pt"}
            continue
        assert parse_defense(name).params == entry.params
    out = listing()
    assert set(DEFENSES) | {"pgd-at", "trades"} == set(out)
    assert out["ueraser-max"] == {"kind": "loss", "params": {"repeat": 5, "epochs": 0,
                                                             "plasma_p": 1.0},
                                  "paper": DEFENSES["ueraser-max"].paper,
                                  "note": DEFENSES["ueraser-max"].note}
