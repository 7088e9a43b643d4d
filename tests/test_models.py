import pytest
import torch

from ue_dist.core.config import SettingsError
from ue_dist.core.models import ARCHITECTURES, SmallCNN, WideResNet, WithNormalize, build_model

torch.set_num_threads(1)

# (arch, parameter count in millions at 10 classes, 32x32x3): the CIFAR variants' known sizes
EXPECTED_MPARAMS = {"small-cnn": 0.14, "resnet18": 11.17, "resnet34": 21.28, "resnet50": 23.52,
                    "vgg11": 9.23, "vgg16": 14.73, "vgg19": 20.04, "densenet121": 6.96, "mobilenetv2": 2.24,
                    "wrn-28-10": 36.48, "wrn-34-10": 46.16, "wrn-16-2": 0.69}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_architecture_builds_runs_and_has_its_cifar_size(arch):
    model = build_model(arch, 10, 3, 32)
    n = sum(p.numel() for p in model.parameters()) / 1e6
    assert n == pytest.approx(EXPECTED_MPARAMS[arch], abs=0.01)
    model.eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize("arch", ["small-cnn", "resnet18", "vgg16", "densenet121", "mobilenetv2",
                                  "wrn-16-2"])
def test_small_and_single_channel_inputs(arch):
    model = build_model(arch, 4, 1, 8).eval()
    with torch.no_grad():
        assert model(torch.rand(3, 1, 8, 8)).shape == (3, 4)


def test_cifar_stems_keep_resolution():
    # 3x3 stride-1 stems and no max-pool for 32x32 input
    r = build_model("resnet18", 10).net
    assert r.conv1.kernel_size == (3, 3) and r.conv1.stride == (1, 1)
    assert isinstance(r.maxpool, torch.nn.Identity)
    d = build_model("densenet121", 10).net
    assert d.features.conv0.kernel_size == (3, 3) and isinstance(d.features.pool0, torch.nn.Identity)
    m = build_model("mobilenetv2", 10).net
    assert m.features[0][0].stride == (1, 1)
    feats = m.features(torch.rand(1, 3, 32, 32))
    assert feats.shape[-1] == 4  # 32 -> 4 as in the CIFAR MobileNetV2


def test_generic_wrn_names_and_bad_names():
    model = build_model("wrn-10-1", 10)
    assert isinstance(model.net, WideResNet)
    with pytest.raises(SettingsError, match="valid: .*resnet18.*vgg16"):
        build_model("resnet19", 10)
    with pytest.raises(ValueError, match="unknown architecture 'wrn-11-2'"):
        build_model("wrn-11-2", 10)


def test_embed_and_net_property_kept():
    model = build_model("small-cnn", 10)
    assert isinstance(model, WithNormalize) and isinstance(model.net, SmallCNN)
    assert model.net.embed(torch.rand(2, 3, 32, 32)).shape == (2, model.net.embedding_dim)
