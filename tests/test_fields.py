"""Every report field is declared once; reductions, row summaries and exporters derive from it."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import stepguard.engine
import stepguard.step_numbers
from stepguard import SpreadSummary, StepGuard, StepReport, distributed
from stepguard.costs import REDUCTIONS as COST_REDUCTIONS
from stepguard.costs import CostMeter
from stepguard.integrations import naming
from stepguard.report import FIELDS, REDUCTIONS, TAG_PREFIX, reduction_of, row_summaries

# ---------------------------------------------------------------------------------------------
# The literal tables as they stood before the declarations replaced them (distributed._MAX,
# _MIN, _PER_ROW, the "count" SUM and the default mean; measure._ROW_SUMMARIES; naming.GAUGES,
# SPREAD, SPREAD_COUNT, NESTED). The derived tables must reproduce them exactly.
OLD_MAX = {
    "delta_a", "max_logit_gap", "spread_q", "tau", "grad_norm", "cost_measure", "cost_idle", "cost_period",
}
OLD_MIN = {"spread_min", "rho_top2", "rho_binary"}
OLD_SUM = {"count"}
OLD_PER_ROW = {"sc_fraction", "sc_zero_loss_fraction", "logz_mean", "logz_sq_mean", "nlm_cosine", "spread_mean"}
OLD_MEAN = {"loss", "update_param_cosine", "extras.loss.base", "entanglement.gram.chosen.rejected"}
OLD_ROW_SUMMARIES = {
    "spread_mean", "spread_min", "spread_q", "rho_top2", "rho_binary", "binding", "values",
    "sc_fraction", "sc_zero_loss_fraction", "max_logit_gap", "logz_mean", "logz_sq_mean", "nlm_cosine",
}
OLD_GAUGES = [
    ("step", "stepguard_step", "Index of the last reported optimizer step."),
    ("tau", "stepguard_step_length", "Step length tau = ||dtheta||_2 of the proposed update."),
    ("rho_a", "stepguard_radius",
     "Safe-step radius rho_a = pi / delta_a along the update direction (+Inf when delta_a = 0)."),
    ("r", "stepguard_normalized_step",
     "Normalized step r = tau / rho_a of the last step; r >= 1 leaves the softmax's radius."),
    ("delta_a", "stepguard_logit_spread",
     "Batch logit spread delta_a = max over samples of max_k a_nk - min_k a_nk."),
    ("scale", "stepguard_step_scale", "Fraction of the proposed update that was applied (0 to 1)."),
    ("applied_tau", "stepguard_applied_step_length", "Length of the update that was applied (scale * tau)."),
    ("measured", "stepguard_step_measured", "1 when the last step was freshly measured, 0 when r was estimated."),
    ("rho_binary", "stepguard_binary_radius", "Exact radius rho* for one- and two-logit heads."),
    ("rho_top2", "stepguard_top2_radius", "Smallest per-sample top-2 radius over the measured batch."),
    ("loss", "stepguard_loss", "Training loss of the last step."),
    ("lr", "stepguard_learning_rate", "Learning rate of the last step."),
    ("grad_norm", "stepguard_grad_norm", "Gradient 2-norm of the last step."),
    ("update_param_cosine", "stepguard_update_param_cosine", "Cosine between the update and the parameters."),
    ("sc_fraction", "stepguard_softmax_collapse_ratio",
     "Fraction of samples whose softmax is exactly one-hot in the training dtype."),
    ("sc_zero_loss_fraction", "stepguard_softmax_collapse_zero_loss_ratio",
     "Fraction of samples whose loss is exactly zero in the training dtype."),
    ("max_logit_gap", "stepguard_max_logit_gap", "Largest gap between the top logit and the runner-up."),
    ("logz_mean", "stepguard_log_partition_mean", "Mean log-partition log sum_k exp z_k."),
    ("logz_sq_mean", "stepguard_log_partition_squared_mean", "Mean squared log-partition."),
    ("nlm_cosine", "stepguard_naive_loss_minimization_cosine",
     "Mean cosine between the logit change and the logits (naive loss minimization)."),
]
OLD_SPREAD = ("stepguard_sample_logit_spread",
              "Distribution of the per-sample logit spreads of the last measured batch.", "stat")
OLD_SPREAD_COUNT = ("stepguard_measured_samples", "Number of samples (or tokens) in the last measured batch.", None)
OLD_NESTED = {
    "entanglement": ("stepguard_entanglement",
                     "Gradient entanglement entries (Gram matrix entries and cosines of the objectives).", "entry"),
    "extras": ("stepguard_extra", "Additional numbers reported by losses and policies.", "name"),
    "timings": ("stepguard_phase_duration_seconds", "Wall time of each phase of the last step.", "phase"),
}
# ---------------------------------------------------------------------------------------------

OLD_REDUCED = {
    **dict.fromkeys(OLD_MAX, "max"), **dict.fromkeys(OLD_MIN, "min"), **dict.fromkeys(OLD_SUM, "sum"),
    **dict.fromkeys(OLD_PER_ROW, "row_mean"), **dict.fromkeys(OLD_MEAN, "mean"),
}


def full_report() -> StepReport:
    """A report with every optional field and every nested mapping filled."""
    return StepReport(
        step=4, tau=2.0, rho_a=0.5, r=4.0, delta_a=2 * math.pi,
        spread=SpreadSummary(count=3, max=6.28, q99=6.0, q90=5.0, median=3.0, mean=3.5, min=1.0,
                             values=(1.0, 3.0, 6.28)),
        action="clip", scale=0.25, applied_tau=0.5, reason="r=4 > 1", rule="clip_r", binding=(2, 0),
        rho_binary=0.7, rho_top2=0.6, loss=1.5, lr=0.1, grad_norm=3.0, update_param_cosine=-0.2,
        sc_fraction=0.1, sc_zero_loss_fraction=0.05, max_logit_gap=9.0, logz_mean=2.0, logz_sq_mean=4.5,
        nlm_cosine=0.3, entanglement={"gram.chosen.rejected": 0.5}, extras={"loss.base": 1.25},
        timings={"jvp": 0.01}, rank=1, world_size=2,
    )


@pytest.mark.parametrize("name", sorted(OLD_REDUCED))
def test_every_reduction_is_the_pre_refactor_one(name: str) -> None:
    assert distributed.reduction_of(name) == OLD_REDUCED[name]


def test_the_declared_reductions_are_exactly_the_pre_refactor_names() -> None:
    reduced = {f.wire + ("." if f.nested else "") for f in FIELDS.values() if f.reduce != "none"}
    old = {n if n.split(".")[0] not in ("extras", "entanglement") else n.split(".")[0] + "." for n in OLD_REDUCED}
    assert reduced | set(COST_REDUCTIONS) == old


def test_row_summaries_are_the_pre_refactor_set() -> None:
    assert row_summaries() == OLD_ROW_SUMMARIES


def test_prometheus_names_and_help_are_the_pre_refactor_ones() -> None:
    assert [(k, m.name, m.help) for k, m in naming.GAUGES.items()] == OLD_GAUGES
    assert all(m.label is None for m in naming.GAUGES.values())
    assert (naming.SPREAD.name, naming.SPREAD.help, naming.SPREAD.label) == OLD_SPREAD
    assert (naming.SPREAD_COUNT.name, naming.SPREAD_COUNT.help, naming.SPREAD_COUNT.label) == OLD_SPREAD_COUNT
    assert {k: (m.name, m.help, m.label) for k, m in naming.NESTED.items()} == OLD_NESTED


def test_every_scalar_key_keeps_its_series_and_tag() -> None:
    scalars = full_report().scalars()
    assert list(scalars) == [
        "step", "tau", "rho_a", "r", "delta_a", "spread.count", "spread.max", "spread.q99", "spread.q90",
        "spread.median", "spread.mean", "spread.min", "scale", "applied_tau", "measured", "rho_binary",
        "rho_top2", "loss", "lr", "grad_norm", "update_param_cosine", "sc_fraction", "sc_zero_loss_fraction",
        "max_logit_gap", "logz_mean", "logz_sq_mean", "nlm_cosine", "entanglement.gram.chosen.rejected",
        "extras.loss.base", "timings.jvp",
    ]
    assert naming.prometheus_series("spread.count") == ("stepguard_measured_samples", {})
    assert naming.prometheus_series("spread.q99") == ("stepguard_sample_logit_spread", {"stat": "q99"})
    assert naming.prometheus_series("extras.loss.base") == ("stepguard_extra", {"name": "loss.base"})
    assert naming.prometheus_series("rank") is None
    for key in scalars:
        info = FIELDS.get(key) or FIELDS[key.split(".")[0]]
        expected = None if key == "step" else TAG_PREFIX + (key if not info.nested else info.name + ".<key>")
        assert info.tag == expected, key


def test_every_field_carries_a_declaration() -> None:
    for owner in (StepReport, SpreadSummary):
        for f in dataclasses.fields(owner):
            info = f.metadata.get("stepguard")
            assert info is not None, f"{owner.__name__}.{f.name}"
            assert info.meaning and info.reduce in REDUCTIONS, f"{owner.__name__}.{f.name}"


def test_every_exported_number_declares_reduction_prometheus_name_and_help() -> None:
    """Adding a metric is one declaration: a numeric field without one has no series, no tag
    and no reduction, and this test names it."""
    for key in full_report().scalars():
        info = FIELDS.get(key) or FIELDS[key.split(".")[0]]
        assert info.reduce in REDUCTIONS, key
        assert info.prometheus and info.prometheus.startswith("stepguard_"), key
        assert info.help, key
        assert naming.prometheus_series(key) is not None, key


def test_a_new_field_needs_a_declaration() -> None:
    from stepguard.report import _declaration

    @dataclasses.dataclass
    class Grown:
        curvature: float = 0.0

    with pytest.raises(TypeError, match=r"Grown\.curvature has no declaration.*declare\("):
        _declaration(Grown, dataclasses.fields(Grown)[0], "curvature")


def test_fields_sharing_a_tensor_must_declare_it_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    from stepguard import report

    q99 = FIELDS["spread.q99"]
    drifted = {**FIELDS, "spread.q99": dataclasses.replace(q99, reduce="mean")}
    monkeypatch.setattr(report, "FIELDS", drifted)
    with pytest.raises(TypeError, match=r"travel as 'spread_q'.*agree"):
        report._wire_table()


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("curvature", r"no cross-rank reduction is declared for the measured tensor 'curvature'.*stepguard/report\.py"),
        ("r", r"'r' is declared with reduce='none'"),
        ("timings.jvp", r"'timings' is declared with reduce='none'"),
        ("spread.max", r"travels to the reduction as 'delta_a'"),
    ],
)
def test_an_undeclared_name_is_an_error_saying_where_to_declare_it(name: str, match: str) -> None:
    with pytest.raises(LookupError, match=match):
        reduction_of(name)
    with pytest.raises(LookupError, match=match):
        distributed.reduce_across_ranks({"tau": torch.ones(()), name: torch.ones(())})


def test_cost_tensors_declare_their_reduction() -> None:
    meter = CostMeter(measure=0.2, idle=0.01, plain=0.5)
    assert set(meter.tensors(torch.zeros(()))) == set(COST_REDUCTIONS)


class _TwoRanks:
    """torch.distributed for an in-process two-rank reduction: the first pass records the other
    rank's packed vector, the second gathers it beside this rank's own (rank 0 first)."""

    def __init__(self) -> None:
        self.recorded: list[torch.Tensor] = []
        self.replay: list[torch.Tensor] | None = None
        self.collectives = 0

    def all_gather(self, out: list[torch.Tensor], buf: torch.Tensor, group: object = None) -> None:
        self.collectives += 1
        if self.replay is None:
            self.recorded.append(buf.clone())
            return
        out[0].copy_(buf)
        out[1].copy_(self.replay.pop(0))

    def reduce(self, mine: dict, theirs: dict, monkeypatch: pytest.MonkeyPatch) -> dict:
        monkeypatch.setattr(distributed, "is_distributed", lambda group=None: True)
        monkeypatch.setattr(distributed.dist, "get_world_size", lambda group=None: 2)
        monkeypatch.setattr(distributed.dist, "all_gather", self.all_gather)
        distributed.reduce_across_ranks(theirs)
        self.replay = self.recorded
        return distributed.reduce_across_ranks(mine)


def test_each_reduction_combines_two_ranks_by_its_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    def t(*x: float) -> torch.Tensor:
        return torch.tensor(x[0] if len(x) == 1 else list(x), dtype=torch.float64)

    mine = {"tau": t(1.0), "count": t(3.0), "spread_q": t(1.0, 5.0, 2.0), "spread_min": t(0.5),
            "logz_sq_mean": t(2.0), "loss": t(1.0), "extras.loss.base": t(4.0), "cost_idle": t(math.nan)}
    theirs = {"tau": t(2.0), "count": t(1.0), "spread_q": t(3.0, 4.0, 2.5), "spread_min": t(0.25),
              "logz_sq_mean": t(6.0), "loss": t(3.0), "extras.loss.base": t(0.0), "cost_idle": t(0.1)}
    ranks = _TwoRanks()
    out = ranks.reduce(mine, theirs, monkeypatch)
    assert ranks.collectives == 2  # one per call: every field in one vector
    assert float(out["tau"]) == 2.0  # max
    assert float(out["count"]) == 4.0  # sum
    assert out["spread_q"].tolist() == [3.0, 5.0, 2.5]  # max, element by element
    assert float(out["spread_min"]) == 0.25  # min
    assert float(out["logz_sq_mean"]) == pytest.approx((2.0 * 3 + 6.0 * 1) / 4)  # row-count weighted
    assert float(out["loss"]) == 2.0 and float(out["extras.loss.base"]) == 2.0  # mean
    assert math.isnan(float(out["cost_idle"]))  # NaN on one rank stays NaN


class _Components(nn.Module):
    """A cross-entropy that reports a named part, as the losses of stepguard.losses do."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(logits, targets)
        self.components = {"base": loss.detach()}
        return loss


@pytest.mark.filterwarnings("ignore:batched vector-Jacobian product unavailable")
@pytest.mark.parametrize("classes", [5, 2])
def test_every_tensor_the_guard_sends_to_the_reduction_is_declared(
    monkeypatch: pytest.MonkeyPatch, classes: int
) -> None:
    sent: list[str] = []

    def recording(values, group=None):
        sent.extend(values)
        return real(values, group)

    real = distributed.reduce_across_ranks
    monkeypatch.setattr(stepguard.engine, "is_distributed", lambda group=None: True)
    monkeypatch.setattr(stepguard.engine, "rank_and_world", lambda group=None: (0, 1))
    monkeypatch.setattr(stepguard.step_numbers, "reduce_across_ranks", recording)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, classes)).double()
    guard = StepGuard(torch.optim.SGD(net.parameters(), lr=0.1), model=net)
    guard.engine.loss = components = _Components()  # read after each step for extras.loss.*
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, classes, (6,))
    for _ in range(2):  # the second step carries the cost averages
        guard.zero_grad()
        logits = net(x)
        logp = F.log_softmax(logits, dim=1)
        guard.watch(chosen=logp[:, 0].sum(), rejected=logp[:, 1].sum())
        loss = components(logits, y)
        loss.backward()
        guard.step(targets=y, loss=loss)
    expected = {"tau", "delta_a", "count", "spread_q", "spread_min", "spread_mean", "rho_top2", "grad_norm",
                "update_param_cosine", "loss", "cost_measure", "cost_idle", "cost_period"}
    assert expected <= set(sent)
    assert any(n.startswith("entanglement.") for n in sent) and "extras.loss.base" in sent
    assert ("rho_binary" in sent) == (classes == 2)
    for name in sent:
        assert distributed.reduction_of(name) in REDUCTIONS[:-1], name


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"reduce": "median"}, r"reduce='median' is not a reduction; use one of"),
        ({"reduce": "max", "prometheus": "stepguard_x"}, r"needs both a name and a help text"),
    ],
)
def test_a_malformed_declaration_is_refused(kwargs: dict, match: str) -> None:
    from stepguard.report import declare

    with pytest.raises(ValueError, match=match):
        declare("a new number", **kwargs)


@pytest.mark.parametrize("classes", [5, 2])
def test_each_measured_number_scales_with_the_direction_length_by_its_declared_power(classes: int) -> None:
    """Measured along Δθ/(τ/2) instead of Δθ/τ, a number of direction_power p is 2^p times larger;
    the FSDP2 replay relies on it to correct a replay along an assumed length."""
    from stepguard.config import GuardConfig
    from stepguard.geometry.jvp import Batch
    from stepguard.measure import measure_update
    from stepguard.report import direction_powers

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, classes)).double()
    theta = {n: p.detach().clone() for n, p in net.named_parameters()}
    update = {n: 1e-2 * torch.randn_like(p) for n, p in net.named_parameters()}
    x, y = torch.randn(12, 4, dtype=torch.float64), torch.randint(0, classes, (12,))

    def measured(tau: float) -> dict[str, torch.Tensor]:
        _, scalars, _ = measure_update(
            net, theta, update, torch.tensor(tau, dtype=torch.float64), Batch.from_inputs(x),
            config=GuardConfig(), targets=y, summarize_on_host=False,
        )
        return scalars

    powers = direction_powers()
    assert powers == {"delta_a": 1, "spread_q": 1, "spread_min": 1, "spread_mean": 1, "rho_top2": -1,
                      "rho_binary": -1}
    along_tau, along_half = measured(0.3), measured(0.15)
    assert set(along_tau) == set(along_half) and {"delta_a", "rho_top2", "nlm_cosine"} <= set(along_tau)
    for name, value in along_tau.items():
        expected = value * 2.0 ** powers.get(name, 0)
        torch.testing.assert_close(along_half[name], expected, rtol=1e-12, atol=0, msg=name)
