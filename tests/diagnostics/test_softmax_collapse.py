"""Softmax collapse measured in the logits' own dtype, against hand-built logits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from stepguard.diagnostics import absorption_gap, softmax_collapse, softmax_collapse_stats

# Explicit mantissa bits p of each format; one non-maximal term is absorbed when
# e^-Δ ≤ 2^-(p+1), i.e. Δ ≥ ln 2·(p + 1).
MANTISSA_BITS = {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23, torch.float64: 52}
DTYPES = list(MANTISSA_BITS)


def threshold(dtype: torch.dtype) -> float:
    return math.log(2) * (MANTISSA_BITS[dtype] + 1)


def pair_rows(gaps: list[float], dtype: torch.dtype) -> torch.Tensor:
    """Rows [Δ, 0]: the first class leads by Δ."""
    return torch.tensor([[g, 0.0] for g in gaps], dtype=dtype)


def test_absorption_gap_is_ln2_times_mantissa_bits_plus_one():
    expected = {torch.float16: 7.62, torch.bfloat16: 5.55, torch.float32: 16.64, torch.float64: 36.74}
    for dtype, value in expected.items():
        assert absorption_gap(dtype) == pytest.approx(threshold(dtype), abs=1e-12)
        assert absorption_gap(dtype) == pytest.approx(value, abs=5e-3)
    with pytest.raises(TypeError):
        absorption_gap(torch.int64)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_one_term_is_absorbed_exactly_beyond_the_threshold(dtype):
    t = threshold(dtype)
    below = [t - 3.0, t - 1.0, t - 0.3]
    above = [t + 0.3, t + 1.0, t + 3.0]
    logits = pair_rows(below + above, dtype)
    result = softmax_collapse(logits)
    assert result.count == 6
    assert result.fraction == 0.5
    assert result.zero_loss_fraction is None
    assert result.dtype == str(dtype).removeprefix("torch.")
    only_below = torch.tensor([True] * 3 + [False] * 3)
    assert softmax_collapse(logits, mask=only_below).fraction == 0.0
    assert softmax_collapse(logits, mask=~only_below).fraction == 1.0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_many_terms_absorb_once_their_sum_is_below_half_an_ulp(dtype):
    # K - 1 = 100 runner-up logits. Their total 100·e^-Δ is below 2^-(p+1) when
    # Δ > threshold + ln 100, so every summation order returns exactly 1; when each term
    # alone exceeds 2^-(p+1) no order can return 1. (In between the result depends on the
    # order in which the kernel adds the terms to 1.)
    t = threshold(dtype)
    gaps = [t + math.log(100) + 0.3, t - 0.3]
    logits = torch.zeros(len(gaps), 101, dtype=dtype)
    for row, gap in enumerate(gaps):
        logits[row, 1:] = -gap
    first = softmax_collapse(logits, mask=torch.tensor([True, False]))
    second = softmax_collapse(logits, mask=torch.tensor([False, True]))
    assert (first.fraction, second.fraction) == (1.0, 0.0)
    # The position of the maximum does not matter.
    assert softmax_collapse(logits.flip(-1)).fraction == 0.5


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zero_loss_needs_collapse_and_the_right_class(dtype):
    t = threshold(dtype)
    logits = pair_rows([t - 0.3, t + 0.3, t - 0.3, t + 0.3], dtype)
    targets = torch.tensor([0, 0, 1, 1])
    result = softmax_collapse(logits, targets)
    assert result.fraction == 0.5
    # Only the collapsed row whose target is the leading class has loss exactly 0.
    assert result.zero_loss_fraction == 0.25


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scale", [1.0, 10.0, 40.0, 200.0])
def test_zero_loss_fraction_counts_exact_zeros_of_cross_entropy(dtype, scale):
    gen = torch.Generator().manual_seed(int(scale))
    logits = (scale * torch.randn(64, 7, generator=gen)).to(dtype)
    targets = logits.float().argmax(-1)
    targets[::5] = torch.randint(0, 7, (13,), generator=gen)
    targets[::7] = -100
    ce = F.cross_entropy(logits, targets, reduction="none")
    assert ce.dtype == dtype
    labelled = targets != -100
    expected = ((ce == 0) & labelled).sum().item() / labelled.sum().item()
    result = softmax_collapse(logits, targets)
    assert result.count == labelled.sum().item()
    assert result.zero_loss_fraction == expected


def test_float16_is_not_upcast():
    # In float16 a gap of 8 already absorbs the runner-up; float32 would not.
    logits = pair_rows([8.0], torch.float16)
    result = softmax_collapse(logits, torch.tensor([0]))
    assert (result.fraction, result.zero_loss_fraction) == (1.0, 1.0)
    assert softmax_collapse(logits.float(), torch.tensor([0])).fraction == 0.0


def test_zero_losses_belong_to_the_dtype_they_were_computed_in():
    targets = torch.tensor([0])
    fp64 = pair_rows([30.0], torch.float64)
    assert F.cross_entropy(fp64, targets).item() > 0  # ≈ e^-30 ≈ 9.4e-14
    assert softmax_collapse(fp64, targets).zero_loss_fraction == 0.0
    assert softmax_collapse(fp64.float(), targets).zero_loss_fraction == 1.0
    # Just below the float64 threshold the loss is log(1 + 2^-52) ≈ 2^-52; a measurement
    # that narrowed it to float16 would flush it to 0.
    near = pair_rows([threshold(torch.float64) - 0.3], torch.float64)
    loss = F.cross_entropy(near, targets)
    assert loss.item() == pytest.approx(2.0**-52, rel=1e-12) and loss.half().item() == 0.0
    assert softmax_collapse(near, targets).zero_loss_fraction == 0.0


def test_float64_loss_cast_to_float32_underflows_to_zero():
    # The reference cross_entropy_float64 (arXiv 2501.04697) returns its float64 loss cast
    # to float32. Any float64 loss below 2^-150 (half the smallest float32 subnormal) then
    # reads as exactly 0: here the accurate loss log1p(e^-Δ) of a row [Δ, 0] with target 0.
    gaps = torch.tensor([60.0, 103.0, 105.0, 120.0], dtype=torch.float64)
    accurate = torch.log1p(torch.exp(-gaps))
    assert (accurate > 0).all()
    as_float32 = accurate.float()
    assert as_float32[:2].gt(0).all() and as_float32[2:].eq(0).all()
    assert math.log(2) * 150 == pytest.approx(103.97, abs=0.01)


def test_sequence_shapes_masks_and_ignore_index():
    t = threshold(torch.float32)
    hi, lo = t + 1.0, t - 1.0
    # (N=2, T=3, K=3): row (n, t) leads with class 0 by the given gap.
    gaps = [[hi, lo, hi], [lo, hi, 0.5]]
    logits = torch.zeros(2, 3, 3)
    for n in range(2):
        for s in range(3):
            logits[n, s, 1:] = -gaps[n][s]
    targets = torch.tensor([[0, 0, -100], [0, 2, 0]])
    mask = torch.tensor([[True, True, True], [False, True, True]])
    result = softmax_collapse(logits, targets, mask=mask)
    # Counted: (0,0) collapsed zero-loss, (0,1) neither, (1,1) collapsed wrong class, (1,2) neither.
    assert result.count == 4
    assert result.fraction == 0.5
    assert result.zero_loss_fraction == 0.25
    assert result.max_logit_gap == pytest.approx(hi)
    custom = softmax_collapse(logits, targets.masked_fill(targets == -100, 7), ignore_index=7)
    assert custom.count == 5
    with pytest.raises(ValueError, match="mask"):
        softmax_collapse(logits, mask=torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="targets"):
        softmax_collapse(logits, torch.zeros(6, dtype=torch.long))


def test_nothing_counted_gives_nan():
    logits = torch.randn(3, 4)
    result = softmax_collapse(logits, torch.full((3,), -100))
    assert result.count == 0
    assert math.isnan(result.fraction) and math.isnan(result.zero_loss_fraction)
    stats = softmax_collapse_stats(logits, mask1d=torch.zeros(3, dtype=torch.bool))
    assert all(math.isnan(stats[k].item()) for k in ("sc_fraction", "max_logit_gap", "logz_mean"))


def test_stats_are_zero_dim_tensors_matching_the_host_result():
    gen = torch.Generator().manual_seed(0)
    logits = (30 * torch.randn(40, 5, generator=gen)).to(torch.bfloat16)
    targets = torch.randint(0, 5, (40,), generator=gen)
    targets[:6] = -100
    mask = torch.arange(40) % 3 != 0
    stats = softmax_collapse_stats(logits, targets, mask)
    assert set(stats) == {
        "sc_fraction",
        "sc_zero_loss_fraction",
        "max_logit_gap",
        "logz_mean",
        "logz_sq_mean",
        "count",
    }
    assert all(v.dim() == 0 for v in stats.values())
    host = softmax_collapse(logits, targets, mask=mask)
    assert stats["count"].item() == host.count
    assert stats["sc_fraction"].item() == pytest.approx(host.fraction)
    assert stats["sc_zero_loss_fraction"].item() == pytest.approx(host.zero_loss_fraction)
    assert stats["max_logit_gap"].item() == pytest.approx(host.max_logit_gap)
    assert "sc_zero_loss_fraction" not in softmax_collapse_stats(logits)


def test_logit_gap_and_log_partition_by_hand():
    logits = torch.tensor(
        [
            [0.0, 0.0, 0.0, 0.0],  # log Z = ln 4, gap 0
            [1000.0, 1000.0, -5.0, -5.0],  # log Z = 1000 + ln 2 (a naive exp overflows)
            [3.0, -2.0, 0.0, 1.0],  # gap 2
            [90.0, 0.0, 0.0, 0.0],  # masked out
        ]
    )
    mask = torch.tensor([True, True, True, False])
    stats = softmax_collapse_stats(logits, mask1d=mask)
    logz = torch.tensor([math.log(4), 1000 + math.log(2), torch.logsumexp(logits[2], 0).item()])
    assert stats["max_logit_gap"].item() == 2.0
    assert stats["logz_mean"].item() == pytest.approx(logz.mean().item(), rel=1e-6)
    assert stats["logz_sq_mean"].item() == pytest.approx(logz.square().mean().item(), rel=1e-6)
    assert stats["count"].item() == 3
    # Half-precision logits beyond exp's range still give a finite log Z.
    half = torch.tensor([[60000.0, 60000.0]], dtype=torch.float16)
    assert softmax_collapse_stats(half)["logz_mean"].item() == pytest.approx(60000 + math.log(2))


def test_needs_two_classes():
    with pytest.raises(ValueError, match="two classes"):
        softmax_collapse(torch.zeros(4, 1))
    with pytest.raises(ValueError, match="two classes"):
        softmax_collapse_stats(torch.zeros(4, 1))
