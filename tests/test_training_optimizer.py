"""Training uses torch's fused Adam/AdamW where it exists (a faster update of the wide gene layers) and gets the
same weights as the unfused optimizer up to float rounding (issue 9: the her2st benchmark with ensembles)."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.usefixtures("single_threaded")


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_fused_optimizer_matches_the_unfused_update(name):
    import torch

    from hespotex.models._autoencoder import GraphAttentionAutoencoder
    from hespotex.tl.model._data import edge_index
    from hespotex.tl.training._training import make_optimizer

    rng = np.random.default_rng(0)
    x = torch.from_numpy((rng.random((80, 200)) < 0.4) * rng.random((80, 200)).astype(np.float32) * 3).float()
    edges = torch.from_numpy(edge_index(rng.random((80, 2)) * 500, 6)).long()
    cls = getattr(torch.optim, name)
    weights = {}
    for fused in (True, False):
        torch.manual_seed(0)
        ae = GraphAttentionAutoencoder(200, 32, 8)
        params = list(ae.parameters())
        opt = (
            make_optimizer(cls, params, lr=1e-3, weight_decay=1e-4)
            if fused
            else cls(params, lr=1e-3, weight_decay=1e-4)
        )
        assert bool(opt.defaults.get("fused")) is fused  # CPU parameters: torch's fused kernel
        for _ in range(30):
            loss, _ = ae.loss(x, edges)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 5)
            opt.step()
        weights[fused] = [p.detach().clone() for p in params]
    start = GraphAttentionAutoencoder(200, 32, 8)
    for a, b, s in zip(weights[True], weights[False], start.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)  # the same training up to float rounding
        assert not torch.allclose(a, s.detach())  # and it did train


def test_make_optimizer_leaves_unsupported_parameters_unfused():
    import torch

    from hespotex.tl.training._training import make_optimizer

    doubles = [torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))]
    assert make_optimizer(torch.optim.Adam, doubles, lr=1e-3, weight_decay=0.0).defaults.get("fused")
    meta = [torch.nn.Parameter(torch.zeros(3, device="meta"))]
    assert not make_optimizer(torch.optim.AdamW, meta, lr=1e-3, weight_decay=0.0).defaults.get("fused")
