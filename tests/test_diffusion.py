"""The avatar defence: the VP schedule, DDPM's reverse chain, the denoiser's training and
checkpoint, and the defence and command that use them (core/diffusion.py)."""
from __future__ import annotations

import io
import math
import pickle

import pytest
import torch
from torch import nn

from ue_dist.core.config import SettingsError
from ue_dist.core.defenses import eot_views, parse_defense, preprocess
from ue_dist.core.diffusion import (Denoiser, DenoiserUNet, alphas_cumprod, purify, timesteps,
                                    train_denoiser)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_schedule_is_score_sdes_vp_schedule():
    a = alphas_cumprod()
    assert a[0] == 1 and len(a) == 1001 and bool((a[1:] < a[:-1]).all())
    # the discrete chain follows the continuous VP-SDE's abar(t) = exp(-t^2 (b1-b0)/2 - b0 t)
    for step in (60, 200, 1000):
        t = step / 1000
        assert math.log(float(a[step])) == pytest.approx(-0.5 * 19.9 * t * t - 0.1 * t, rel=2e-2)


def test_timesteps_run_from_t_star_to_zero():
    assert timesteps(60, 0) == list(range(60, -1, -1))
    assert timesteps(5, 99) == [5, 4, 3, 2, 1, 0]
    seq = timesteps(60, 10)
    assert seq[0] == 60 and seq[-1] == 0 and len(seq) == 11 and seq == sorted(seq, reverse=True)


class _Oracle(nn.Module):
    """The exact noise predictor of a dataset that is one image: (x_t - sqrt(abar) x*) /
    sqrt(1 - abar). DDPM's chain with it must return x* from any start."""

    def __init__(self, target: torch.Tensor) -> None:
        super().__init__()
        self.target = nn.Parameter(target * 2 - 1, requires_grad=False)
        self.abar = alphas_cumprod().float()

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.abar[t][:, None, None, None]
        return (x - a.sqrt() * self.target) / (1 - a).sqrt()


@pytest.mark.parametrize("steps", [0, 7])
def test_the_reverse_chain_recovers_the_one_image_of_an_exact_model(steps):
    target = torch.rand(1, 3, 8, 8)
    denoiser = Denoiser(_Oracle(target), t_max=200, image_shape=(3, 8, 8), info={})
    attacked = (target + 8 / 255 * torch.sign(torch.randn(4, 3, 8, 8))).clamp(0, 1)
    out = purify(denoiser, attacked, t_star=60, steps=steps,
                 generator=torch.Generator().manual_seed(0))
    assert out.shape == attacked.shape
    assert (out - target).abs().max() < 1e-4
    assert (attacked - target).abs().max() > 8 / 255 - 1e-6


def test_purify_refuses_other_shapes_and_untrained_levels():
    denoiser = Denoiser(DenoiserUNet(1, 8), t_max=100, image_shape=(1, 8, 8), info={})
    with pytest.raises(ValueError, match=r"trained on \(1, 8, 8\)"):
        purify(denoiser, torch.rand(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"t must lie in \[1, 100\]"):
        purify(denoiser, torch.rand(2, 1, 8, 8), t_star=150)


def test_unet_keeps_odd_shapes():
    net = DenoiserUNet(1, 8)
    x = torch.randn(2, 1, 7, 9)
    assert net(x, torch.tensor([1, 50])).shape == x.shape


def test_training_learns_the_noise_of_a_simple_distribution():
    # two flat gray levels with a little texture: a trained model predicts far better than the
    # untrained one (whose zero output has loss 1, the noise's variance)
    gen = torch.Generator().manual_seed(0)
    levels = torch.tensor([60, 190], dtype=torch.uint8)[torch.randint(0, 2, (64,), generator=gen)]
    images = levels[:, None, None, None].expand(64, 1, 8, 8).clone()
    denoiser = train_denoiser(images, steps=150, batch_size=32, lr=2e-3, t_max=100, width=8,
                              ema=0.9, seed=0)
    assert denoiser.t_max == 100 and denoiser.image_shape == (1, 8, 8)
    assert denoiser.info["final_loss_ema"] < 0.5
    out = purify(denoiser, images[:8].float() / 255, t_star=30, steps=5,
                 generator=torch.Generator().manual_seed(1))
    assert (out - images[:8].float() / 255).abs().mean() < 0.1


def test_checkpoint_round_trip_and_foreign_files_are_refused():
    net = DenoiserUNet(3, 8)
    nn.init.normal_(net.out.weight)
    d = Denoiser(net.eval(), t_max=120, image_shape=(3, 8, 8), info={"steps": 3})
    back = Denoiser.from_bytes(d.to_bytes())
    x, t = torch.rand(2, 3, 8, 8), torch.tensor([3, 90])
    assert torch.equal(back.model(x, t), d.model(x, t))
    assert (back.t_max, back.image_shape, back.info) == (120, (3, 8, 8), {"steps": 3})
    buf = io.BytesIO()
    torch.save({"format": "something-else"}, buf)
    with pytest.raises(ValueError, match="not a denoiser checkpoint"):
        Denoiser.from_bytes(buf.getvalue(), "x.pt")

    class Boom:
        def __reduce__(self):
            return (eval, ("1 + 1",))

    with pytest.raises(ValueError, match="x.pt is not a denoiser checkpoint"):
        Denoiser.from_bytes(pickle.dumps(Boom()), "x.pt")  # weights_only refuses the code


def test_avatar_defence_parses_checks_and_purifies(tmp_path):
    with pytest.raises(SettingsError, match="needs model=PATH"):
        parse_defense("avatar")
    with pytest.raises(SettingsError, match="t must be >= 1"):
        parse_defense("avatar:model=m.pt,t=0")
    with pytest.raises(SettingsError, match="does not exist"):
        preprocess("avatar:model=" + str(tmp_path / "missing.pt"), torch.zeros(1, 3, 8, 8,
                                                                             dtype=torch.uint8))
    with pytest.raises(SettingsError, match="no EOT view"):
        eot_views(["avatar:model=m.pt"])
    assert parse_defense("avatar:model=m.pt").params["model"].endswith("/m.pt")  # made absolute
    path = tmp_path / "d.pt"
    path.write_bytes(Denoiser(DenoiserUNet(3, 8).eval(), 100, (3, 8, 8), {}).to_bytes())
    images = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    spec = f"avatar:model={path},t=40,steps=4"
    a, b = preprocess(spec, images), preprocess(spec, images)
    assert a.dtype == torch.uint8 and a.shape == images.shape and torch.equal(a, b)  # seeded
    assert not torch.equal(a, images)
    with pytest.raises(SettingsError, match=r"trained on \(3, 8, 8\)"):
        preprocess(spec, torch.zeros(2, 1, 8, 8, dtype=torch.uint8))


def test_train_purifier_command_writes_a_checkpoint_once(tmp_path, digits_dir, capsys):
    import json

    from ue_dist.cli import main
    out = tmp_path / "p.pt"
    argv = ["train-purifier", str(digits_dir / "test"), str(out), "--steps", "2", "--batch-size",
            "4", "--width", "8", "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["steps"] == 2 and result["images"] == 360 and result["image_shape"] == [3, 32, 32]
    d = Denoiser.from_bytes(out.read_bytes())
    assert d.t_max == 200 and d.model.width == 8
    assert main(argv) == 2 and "--overwrite" in capsys.readouterr().err
    assert main(["train-purifier", str(digits_dir / "test"), str(digits_dir / "test" / "p.pt"),
                 "--steps", "1"]) == 2
    assert "lies inside the input" in capsys.readouterr().err
    assert not (digits_dir / "test" / "p.pt").exists()
