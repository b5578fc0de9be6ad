"""The measurement helpers shared by the guard and the analyzer."""

from __future__ import annotations

import math

import torch

from stepguard.measure import QUANTILES, _quantiles, sync_to_host


def test_quantiles_match_torch_quantile() -> None:
    gen = torch.Generator().manual_seed(0)
    for n in (1, 2, 7, 64, 1000):
        values = torch.rand(n, generator=gen, dtype=torch.float64) * 10
        expected = torch.quantile(values, torch.tensor(QUANTILES, dtype=torch.float64))
        assert torch.allclose(_quantiles(values), expected, rtol=0, atol=1e-12)


def test_sync_brings_every_value_in_its_place() -> None:
    scalars = {
        "a": torch.tensor(1.5),
        "b": torch.tensor(2, dtype=torch.int64),
        "c": torch.tensor(0.25, dtype=torch.float64),
        "spread_q": torch.tensor([3.0, 2.0, 1.0]),
        "d": torch.tensor(-4.0),
    }
    vectors = {"binding": torch.tensor([5.0, 7.0]), "values": torch.zeros(0)}
    out = sync_to_host(scalars, vectors)
    assert out == {
        "a": 1.5,
        "b": 2.0,
        "c": 0.25,
        "spread_q": [3.0, 2.0, 1.0],
        "d": -4.0,
        "binding": [5.0, 7.0],
        "values": [],
    }


import pytest  # noqa: E402

from stepguard.config import GuardConfig  # noqa: E402
from stepguard.diagnostics import nlm_cosine, softmax_collapse_stats  # noqa: E402
from stepguard.geometry.formulas import logit_spread, top2_radius  # noqa: E402
from stepguard.measure import build_report, row_statistics, step_geometry  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("with_targets", [True, False])
def test_fused_row_statistics_match_the_reference_definitions(dtype, with_targets) -> None:
    gen = torch.Generator().manual_seed(1)
    z = (
        torch.randn(40, 7, generator=gen, dtype=torch.float64)
        * torch.linspace(0.1, 30, 40, dtype=torch.float64)[:, None]
    ).to(dtype)
    a = torch.randn(40, 7, generator=gen, dtype=torch.float64).to(dtype)
    y = torch.randint(0, 7, (40,), generator=gen) if with_targets else None
    got = row_statistics(z, a, y)
    assert torch.equal(got["spread"], logit_spread(a))
    assert torch.allclose(
        got["top2"].double(), top2_radius(z, a, y).double(), rtol=1e-6 if dtype != torch.float64 else 1e-12
    )
    ref = softmax_collapse_stats(z, y)
    for key in ("sc_fraction", "max_logit_gap"):
        assert got[key].item() == ref[key].item(), key
    for key in ("logz_mean", "logz_sq_mean"):
        assert got[key].item() == pytest.approx(ref[key].item(), rel=1e-6), key
    if with_targets:
        assert got["sc_zero_loss_fraction"].item() == ref["sc_zero_loss_fraction"].item()
    assert got["nlm_cosine"].item() == pytest.approx(nlm_cosine(z, a).item(), rel=1e-6, abs=1e-7)
    assert 0 < ref["sc_fraction"].item() < 1 or dtype == torch.float64  # both regimes present


@pytest.mark.parametrize("classes", [1, 2, 5])
def test_host_and_device_summaries_agree(classes) -> None:
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(30, classes, generator=gen)
    a = torch.randn(30, classes, generator=gen)
    y = torch.randint(0, classes, (30,), generator=gen) if classes > 1 else None
    if y is not None:
        y[3] = -100
    cfg = GuardConfig(binding_k=4)
    reports = []
    for on_host in (True, False):
        scalars, vectors = step_geometry(z, a, targets=y, mask=None, config=cfg, summarize_on_host=on_host)
        values = sync_to_host({"tau": torch.tensor(0.5), **scalars}, vectors)
        reports.append(build_report(values, step=0, estimator="jvp", measured=True, binding_k=4))
    host, device = reports
    assert host.delta_a == device.delta_a and host.rho_top2 == device.rho_top2
    assert host.rho_binary == device.rho_binary and (host.rho_binary is not None) == (classes <= 2)
    assert host.binding == device.binding and 3 not in host.binding
    assert host.spread.values == device.spread.values
    for name in ("q99", "q90", "median", "mean", "min", "max"):
        assert getattr(host.spread, name) == pytest.approx(getattr(device.spread, name), rel=1e-12)
    assert host.spread.count == device.spread.count == (29 if y is not None else 30)
    diagnostics = ("sc_fraction", "sc_zero_loss_fraction", "max_logit_gap", "logz_mean", "logz_sq_mean")
    for name in (*diagnostics, "nlm_cosine"):
        h, d = getattr(host, name), getattr(device, name)
        assert (h is None) == (d is None) == (classes == 1), name
        if h is not None:  # float64 sums on the host, float32 means on the device
            assert h == pytest.approx(d, rel=1e-6, abs=1e-7), name


@pytest.mark.parametrize("on_host", [True, False])
def test_masked_rows_host_and_device_agree_and_an_empty_step_reports_no_rows(on_host) -> None:
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(6, 5, 7, generator=gen)
    a = torch.randn(6, 5, 7, generator=gen)
    y = torch.randint(0, 7, (6, 5), generator=gen)
    y[:, 3:] = -100
    mask = torch.rand(6, 5, generator=gen) > 0.3
    cfg = GuardConfig(binding_k=3)
    scalars, vectors = step_geometry(z, a, targets=y, mask=mask, config=cfg, summarize_on_host=on_host)
    report = build_report(
        sync_to_host({"tau": torch.tensor(0.5), **scalars}, vectors), step=0, estimator="jvp",
        measured=True, binding_k=3,
    )
    keep = (mask & (y != -100)).reshape(-1)
    kept = keep.nonzero().squeeze(1)
    z_rows, a_rows, y_rows = z.reshape(-1, 7)[kept], a.reshape(-1, 7)[kept], y.reshape(-1)[kept]
    spreads = logit_spread(a_rows).double()
    radii = top2_radius(z_rows, a_rows, y_rows).double()
    assert report.spread.count == int(keep.sum())
    assert report.delta_a == spreads.max().item()
    assert report.spread.mean == pytest.approx(spreads.mean().item(), rel=1e-12)
    assert report.rho_top2 == radii.min().item()
    assert report.binding == tuple(kept[radii.argsort()[:3]].tolist())  # flat row positions
    assert sorted(report.spread.values) == sorted(spreads.tolist())
    ref = softmax_collapse_stats(z_rows, y_rows)
    assert report.logz_mean == pytest.approx(ref["logz_mean"].item(), rel=1e-6)
    assert report.nlm_cosine == pytest.approx(nlm_cosine(z_rows, a_rows).item(), rel=1e-5, abs=1e-7)

    nothing = torch.zeros(6, 5, dtype=torch.bool)
    scalars, vectors = step_geometry(z, a, targets=y, mask=nothing, config=cfg, summarize_on_host=on_host)
    empty = build_report(
        sync_to_host({"tau": torch.tensor(0.5), **scalars}, vectors), step=0, estimator="jvp", measured=True
    )
    # no row counted: nothing was measured (not r = 0 from Δ_a = 0)
    assert not empty.measured and empty.estimator == "none" and math.isnan(empty.r)
    assert empty.spread.count == 0 and empty.rho_top2 is None and empty.binding == ()
    assert empty.sc_fraction is None
    later = build_report(
        sync_to_host({"tau": torch.tensor(0.5), **scalars}, vectors), step=1, estimator="jvp",
        measured=True, last_rho=2.0,
    )
    assert not later.measured and later.estimator == "estimate" and later.r == 0.25


def test_measuring_a_masked_batch_forces_no_host_sync() -> None:
    """No op that makes a GPU wait (nonzero, item, masked_select …) runs before the one transfer."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from stepguard.geometry.jvp import Batch
    from stepguard.measure import measure_update

    syncing = {"nonzero", "_local_scalar_dense", "masked_select", "is_nonzero", "equal", "unique", "_unique2"}
    seen: list[str] = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func.__name__.split(".")[0])
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5))
    theta = {n: p.detach().clone() for n, p in net.named_parameters()}
    update = {n: torch.randn_like(p) for n, p in net.named_parameters()}
    x = torch.randn(3, 8, 4)
    y = torch.randint(0, 5, (3, 8))
    y[0, 5:] = -100
    mask = torch.rand(3, 8) > 0.2
    for on_host in (True, False):
        seen.clear()
        with Record():
            measure_update(
                net, theta, update, torch.tensor(2.0), Batch.from_inputs(x), config=GuardConfig(),
                targets=y, mask=mask, summarize_on_host=on_host,
            )
        assert {"amax", "amin"} <= set(seen) and not syncing & set(seen), sorted(syncing & set(seen))


@pytest.mark.parametrize("on_host", [True, False])
def test_without_diagnostics_the_radius_is_the_same_and_the_diagnostics_are_absent(on_host) -> None:
    gen = torch.Generator().manual_seed(4)
    z, a = torch.randn(20, 6, generator=gen), torch.randn(20, 6, generator=gen)
    y = torch.randint(0, 6, (20,), generator=gen)
    reports = []
    for diagnostics in (True, False):
        cfg = GuardConfig(diagnostics=diagnostics)
        scalars, vectors = step_geometry(z, a, targets=y, mask=None, config=cfg, summarize_on_host=on_host)
        values = sync_to_host({"tau": torch.tensor(0.5), **scalars}, vectors)
        reports.append(build_report(values, step=0, estimator="jvp", measured=True))
    full, lean = reports
    assert (lean.delta_a, lean.rho_top2, lean.binding, lean.spread) == (
        full.delta_a, full.rho_top2, full.binding, full.spread
    )
    assert full.sc_fraction is not None and full.nlm_cosine is not None
    assert lean.sc_fraction is None and lean.nlm_cosine is None and lean.logz_mean is None
