"""The FSDP2 norms from the ranks' parts, and the correction of a replay along an assumed length."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from stepguard.distributed import norms_from_sums, shard_sums
from stepguard.norms import ShardedNorms


def test_the_norms_of_two_shards_are_those_of_the_whole_vector() -> None:
    gen = torch.Generator().manual_seed(0)
    delta, theta, grad = (torch.randn(10, generator=gen, dtype=torch.float64) for _ in range(3))
    parts = [
        shard_sums(torch.linalg.vector_norm(delta[s]), [delta[s]], [theta[s]], [grad[s]])
        for s in (slice(0, 4), slice(4, 10))
    ]
    summed = {name: float(parts[0][name] + parts[1][name]) for name in parts[0]}
    got = norms_from_sums(summed)
    assert got["tau"] == pytest.approx(float(torch.linalg.vector_norm(delta)), rel=1e-14)
    assert got["grad_norm"] == pytest.approx(float(torch.linalg.vector_norm(grad)), rel=1e-14)
    cosine = float(torch.nn.functional.cosine_similarity(delta, theta, dim=0))
    assert got["update_param_cosine"] == pytest.approx(cosine, rel=1e-12)


def test_a_zero_vector_has_cosine_zero_and_a_nan_stays_nan() -> None:
    zero = {"shard.delta_sq": 0.0, "shard.grad_sq": 4.0, "shard.dot": 0.0, "shard.theta_sq": 9.0}
    assert norms_from_sums(zero) == {"tau": 0.0, "grad_norm": 2.0, "update_param_cosine": 0.0}
    poisoned = norms_from_sums({**zero, "shard.delta_sq": math.nan})
    assert math.isnan(poisoned["tau"]) and math.isnan(poisoned["update_param_cosine"])


def test_finish_corrects_the_statistics_from_the_reference_length_to_tau() -> None:
    """Replayed along Δθ/2 where τ = 4: velocities twice too large, radii half too small."""
    norms = ShardedNorms()
    norms.reference_tau = 2.0
    assert float(norms.replay_length(SimpleNamespace(tau=torch.tensor(1.0)))) == 2.0  # no collective
    reduced = {
        "tau": 1.0, "shard.delta_sq": 16.0, "shard.grad_sq": 1.0, "shard.dot": 0.0, "shard.theta_sq": 1.0,
        "delta_a": 6.0, "spread_q": [4.0, 2.0, 1.0], "spread_min": 0.5, "spread_mean": 1.5,
        "rho_top2": 1.0, "nlm_cosine": 0.25, "count": 8.0,
    }
    out = norms.finish(reduced)
    assert out["tau"] == 4.0 and out["grad_norm"] == 1.0
    assert (out["delta_a"], out["spread_q"], out["spread_min"], out["spread_mean"]) == (3.0, [2.0, 1.0, 0.5], 0.25, 0.75)
    assert out["rho_top2"] == 2.0
    assert (out["nlm_cosine"], out["count"]) == (0.25, 8.0)  # independent of the direction's length
    assert not any(name.startswith("shard.") for name in out)
    assert norms.reference_tau == 4.0  # the next replay runs along Δθ/4
