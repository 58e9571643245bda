"""The encoder's memory layout and batch size in the embedding loop (speed settings that must not change results).

EfficientNet runs channels-last (NHWC) in :func:`hespotex.pp._embed.encode_patches` and the streamed
prediction runs small inputs in larger batches; both must give the features of the plain NCHW
forward in batches of 64, up to float rounding.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

pytestmark = pytest.mark.usefixtures("single_threaded")


@pytest.fixture(scope="module")
def encoder():
    from hespotex.pp._encoders import load_encoder

    return load_encoder("efficientnet_lite0.imagenet", input_size=32)


def test_efficientnet_runs_channels_last_and_other_modules_keep_their_layout(encoder):
    import torch

    from hespotex.pp._embed import memory_format

    assert memory_format(encoder.model) is torch.channels_last

    class Flatten(torch.nn.Module):  # a user module that views its activations: needs the default layout
        def forward(self, x):
            return x.view(x.shape[0], -1)[:, :8]

    assert memory_format(Flatten()) is torch.contiguous_format


def test_channels_last_features_equal_the_plain_forward(encoder, sample_factory):
    import torch

    from hespotex.pp._embed import encode_patches
    from hespotex.pp._patches import plan_patches, resize_batch

    sdata = sample_factory(n_spots=150, image_shape=(400, 400), mpp=1.0, spot_diameter_um=16.0)
    plan = plan_patches(sdata, patch_um=16.0, out_px=32)
    reference_net = copy.deepcopy(encoder.model).to(memory_format=torch.contiguous_format)
    got = encode_patches(plan, encoder, batch_size=64, device="cpu")
    assert encoder.model.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)  # it did run NHWC
    mean = torch.tensor(encoder.mean).view(1, 3, 1, 1)
    std = torch.tensor(encoder.std).view(1, 3, 1, 1)
    with torch.inference_mode():
        x = resize_batch(plan.read(np.arange(150)), 32).sub_(mean).div_(std)
        assert x.is_contiguous()
        want = reference_net(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # the streamed prediction's larger batches for small inputs: the same features
    from hespotex.tl.prediction._stream_stages import encoder_batch_size

    assert encoder_batch_size(encoder) == 256
    np.testing.assert_allclose(encode_patches(plan, encoder, batch_size=256, device="cpu"), got, rtol=1e-4, atol=1e-4)


def test_encoder_batch_size_keeps_pixels_per_forward():
    from types import SimpleNamespace

    from hespotex.tl.prediction._stream_stages import BATCH_SIZE, encoder_batch_size

    assert encoder_batch_size(SimpleNamespace(input_size=224)) == BATCH_SIZE
    assert encoder_batch_size(SimpleNamespace(input_size=448)) == BATCH_SIZE
    assert encoder_batch_size(SimpleNamespace(input_size=112)) == 4 * BATCH_SIZE
    assert encoder_batch_size(SimpleNamespace(input_size=32)) == 4 * BATCH_SIZE
