"""The ensemble members' agreement per gene (issue 9, item 6): exact in memory, from whole row chunks when streamed."""

from __future__ import annotations

import itertools

import numpy as np

from hespotex.tl.model._ensemble import member_agreement
from hespotex.tl.prediction._stream_ensemble import sampled_agreement


def _members(n_spots: int = 5000, n_genes: int = 6, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    signal = rng.normal(size=(n_spots, n_genes)) + 3.0
    noise = np.linspace(0.1, 3.0, n_genes)  # gene by gene, the members agree less
    return np.stack([signal + rng.normal(size=signal.shape) * noise for _ in range(4)]).astype(np.float32)


def test_agreement_is_the_mean_pairwise_pearson():
    stack = _members()
    expected = [
        np.mean([np.corrcoef(stack[a, :, g], stack[b, :, g])[0, 1] for a, b in itertools.combinations(range(4), 2)])
        for g in range(stack.shape[2])
    ]
    got = member_agreement(stack)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert np.all(np.diff(got) < 0)  # noisier genes, less agreement
    stack[2, :, 1] = 7.0  # a member predicting a gene as constant: undefined there, not 0
    assert np.isnan(member_agreement(stack)[1]) and np.isfinite(np.delete(member_agreement(stack), 1)).all()
    assert np.isnan(member_agreement(stack[:1])).all()  # one member agrees with nobody


def test_streamed_agreement_reads_whole_chunks_up_to_the_cap():
    stack = _members()
    members = list(stack)  # row-sliceable like the members' zarr arrays
    full, n = sampled_agreement(members, rows=100)
    assert n == 5000
    np.testing.assert_allclose(full, member_agreement(stack), atol=1e-6)
    part, n = sampled_agreement(members, rows=100, max_spots=1000, seed=3)
    assert n == 1000  # 10 whole chunks of 100 rows
    np.testing.assert_allclose(part, full, atol=0.05)  # an estimate of the same agreement
    again, _ = sampled_agreement(members, rows=100, max_spots=1000, seed=3)
    np.testing.assert_array_equal(again, part)  # seeded: the same chunks every time
