"""BatchNorm folded into a frozen encoder's convolutions: same features, no BatchNorm left, nothing else touched."""

from __future__ import annotations

import copy

import numpy as np
import pytest

pytestmark = pytest.mark.usefixtures("single_threaded")


def _count(model, names):
    return sum(type(m).__name__ in names for m in model.modules())


@pytest.mark.parametrize("name", ["efficientnet_lite0.imagenet", "resnet18"])
def test_folded_encoder_gives_the_same_features_without_batchnorm(name):
    import torch

    from hespotex.pp._encoders import load_encoder
    from hespotex.pp._fold_batchnorm import fold_batchnorm

    model = load_encoder(name, input_size=64).model.eval()
    before = copy.deepcopy(model.state_dict())
    assert _count(model, ("BatchNorm2d", "BatchNormAct2d")) > 10
    folded = fold_batchnorm(model)
    assert folded is not model
    assert _count(folded, ("BatchNorm2d", "BatchNormAct2d")) == 0  # every one folded
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        np.testing.assert_allclose(folded(x).numpy(), model(x).numpy(), rtol=1e-4, atol=1e-4)
    after = model.state_dict()  # the original is left as it was
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert _count(model, ("BatchNorm2d", "BatchNormAct2d")) > 10


def test_modules_that_cannot_be_folded_are_returned_unchanged():
    import torch

    from hespotex.pp._encoders import load_encoder
    from hespotex.pp._fold_batchnorm import fold_batchnorm

    model = load_encoder("efficientnet_lite0.imagenet", input_size=64).model
    model.train()  # batch statistics: nothing to fold
    assert fold_batchnorm(model) is model
    model.eval()
    handle = model.blocks[2].register_forward_hook(lambda *a: None)  # observed by the user: run the network itself
    assert fold_batchnorm(model) is model
    handle.remove()
    assert fold_batchnorm(model) is not model

    class Crossed(torch.nn.Module):  # a BatchNorm registered after a convolution it does not read
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(3)
            self.bn.running_var.fill_(4.0)
            torch.nn.init.constant_(self.bn.weight, 3.0)

        def forward(self, x):
            return (self.conv(x) + self.bn(x)).mean(dim=(2, 3))

    crossed = Crossed().eval()
    crossed.__class__.__module__ = "timm.models.crossed"
    crossed.__class__.__name__ = "ResNet"  # claims to be a foldable family: the probe catches the wrong fold
    assert fold_batchnorm(crossed) is crossed
    user = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()  # not a timm network
    assert fold_batchnorm(user) is user


def test_a_fold_is_reused_until_the_weights_change():
    import torch

    from hespotex.pp._encoders import load_encoder
    from hespotex.pp._fold_batchnorm import fold_batchnorm

    model = load_encoder("efficientnet_lite0.imagenet", input_size=64).model.eval()
    first = fold_batchnorm(model)
    assert fold_batchnorm(model) is first  # streamed chunks do not fold (and probe) again
    with torch.no_grad():
        model.conv_stem.weight.mul_(2.0)  # changed in place: the kept fold would be stale
    again = fold_batchnorm(model)
    assert again is not first
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        np.testing.assert_allclose(again(x).numpy(), model(x).numpy(), rtol=1e-4, atol=1e-4)
