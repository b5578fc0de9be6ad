"""The replay: agreement with the live guard, bad inputs, buffers, modes, flips and CLD."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from analysis_helpers import HIDDEN, GuardedRun, guarded_run, small_mlp
from torch import nn

from stepguard import radius
from stepguard.analysis import (
    AnalysisError,
    CheckpointError,
    FactoryError,
    NoCheckpointsError,
    Probe,
    ProbeError,
    analyze,
    load_factory,
    load_probe,
)
from stepguard.analysis.model import build_model


def bn_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, HIDDEN), nn.BatchNorm1d(HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 10))


# ---------------------------------------------------------------- live vs replay


def test_replay_reports_the_r_the_live_guard_reported(monitor_run: GuardedRun) -> None:
    result = analyze(monitor_run.ckpt_dir, small_mlp, Probe(monitor_run.x, monitor_run.y))
    assert len(result.transitions) == len(monitor_run.reports) == 5
    assert not result.missing
    for live, t in zip(monitor_run.reports, result.transitions, strict=True):
        rep = t.report
        assert (t.step_from, t.step_to, rep.step) == (live.step, live.step + 1, live.step)
        assert rep.source == "replay" and live.action == "allow"
        assert rep.tau == pytest.approx(live.tau, rel=1e-6)
        assert rep.rho_a == pytest.approx(live.rho_a, rel=1e-6)
        assert rep.r == pytest.approx(live.r, rel=1e-6)
        assert rep.sc_fraction == live.sc_fraction
        assert rep.nlm_cosine == pytest.approx(live.nlm_cosine, rel=1e-5, abs=1e-7)
        assert rep.binding == live.binding
        assert rep.loss == pytest.approx(live.loss, rel=1e-6)  # the probe loss at θ_from
        assert 0.0 <= rep.extras["accuracy"] <= 1.0
        # the binding samples' own radii are ≥ ρ_a and start at ρ_top2
        assert len(t.binding_radii) == len(rep.binding)
        assert t.binding_radii[0] == pytest.approx(rep.rho_top2)
        assert all(r >= rep.rho_a * (1 - 1e-6) for r in t.binding_radii)
        assert list(t.binding_radii) == sorted(t.binding_radii)


def test_replay_of_a_clipped_run_measures_the_applied_step(clip_run: GuardedRun) -> None:
    result = analyze(clip_run.ckpt_dir, small_mlp, Probe(clip_run.x, clip_run.y))
    clipped = [r.action == "clip" for r in clip_run.reports]
    assert any(clipped), "the run must clip at least one step"
    for live, t in zip(clip_run.reports, result.transitions, strict=True):
        rep = t.report
        assert rep.tau == pytest.approx(live.applied_tau, rel=1e-5)
        assert rep.rho_a == pytest.approx(live.rho_a, rel=1e-4)
        assert rep.r == pytest.approx(live.applied_tau / live.rho_a, rel=1e-4)
        if live.action == "clip":
            assert rep.r == pytest.approx(1.0, rel=1e-5)
            assert "r>=1" in t.flags  # at the boundary, within rounding


def test_replay_with_batchnorm_in_train_mode_agrees(tmp_path) -> None:
    run = guarded_run(tmp_path / "bn", factory=bn_mlp, steps=3)
    result = analyze(run.ckpt_dir, bn_mlp, Probe(run.x, run.y))
    for live, t in zip(run.reports, result.transitions, strict=True):
        assert t.report.r == pytest.approx(live.r, rel=1e-5)


def test_eval_mode_uses_the_buffers_of_checkpoint_t(tmp_path) -> None:
    torch.manual_seed(0)
    x, y = torch.rand(40, 64), torch.randint(0, 10, (40,))
    files = []
    model = bn_mlp()
    for k in range(3):
        with torch.no_grad():
            model[1].running_mean.fill_(0.3 * k)  # buffers differ from checkpoint to checkpoint
            model[1].running_var.fill_(1.0 + k)
            model[0].weight.add_(0.05 * torch.randn_like(model[0].weight))
        files.append(tmp_path / f"s{k}.pt")
        torch.save(model.state_dict(), files[-1])
    result = analyze(files, bn_mlp, Probe(x, y), mode="eval")
    for t, (a, b) in zip(result.transitions, itertools.pairwise(files), strict=True):
        at = bn_mlp()
        at.load_state_dict(torch.load(a))
        target = torch.load(b)
        direction = {n: target[n] - p.detach() for n, p in at.named_parameters()}
        expected = radius(at, x, direction, targets=y, mode="eval")
        assert t.report.rho_a == pytest.approx(expected.rho_a, rel=1e-5)
        at.eval()
        with torch.no_grad():
            assert t.report.loss == pytest.approx(F.cross_entropy(at(x), y).item(), rel=1e-5)


def test_dropout_replay_is_deterministic_for_a_seed(tmp_path, monitor_run: GuardedRun) -> None:
    def dropout_mlp() -> nn.Module:
        return nn.Sequential(nn.Linear(64, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 10), nn.Dropout(0.5))

    files = monitor_run.files[:3]
    probe = Probe(monitor_run.x, monitor_run.y)
    first = analyze(files, dropout_mlp, probe, seed=3)
    again = analyze(files, dropout_mlp, probe, seed=3)
    other = analyze(files, dropout_mlp, probe, seed=4)
    evaluated = analyze(files, dropout_mlp, probe, mode="eval")
    plain = analyze(files, small_mlp, probe, mode="eval")
    assert [t.report.r for t in first.transitions] == [t.report.r for t in again.transitions]
    assert [t.report.r for t in first.transitions] != [t.report.r for t in other.transitions]
    # in eval mode dropout is off: the same function as the MLP without it
    assert [t.report.r for t in evaluated.transitions] == pytest.approx(
        [t.report.r for t in plain.transitions]
    )


# ---------------------------------------------------------------- bad checkpoints


def _corrupt(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def test_a_corrupt_checkpoint_is_skipped_and_its_transitions_reported_missing(tmp_path, monitor_run) -> None:
    files = [tmp_path / f.name for f in monitor_run.files]
    for src, dst in zip(monitor_run.files, files, strict=True):
        dst.write_bytes(src.read_bytes())
    _corrupt(files[2])
    probe = Probe(monitor_run.x, monitor_run.y)
    result = analyze(tmp_path, small_mlp, probe)
    assert [(t.step_from, t.step_to) for t in result.transitions] == [(0, 1), (3, 4), (4, 5)]
    assert [(m.step_from, m.step_to) for m in result.missing] == [(1, 2), (2, 3)]
    assert all("step_2.pt skipped: corrupt" in m.reason for m in result.missing)
    bad = [c for c in result.checkpoints if not c.ok]
    assert [c.step for c in bad] == [2] and "corrupt" in bad[0].error
    # the measured transitions are the live ones
    assert result.transitions[1].report.r == pytest.approx(monitor_run.reports[3].r, rel=1e-6)

    bridged = analyze(tmp_path, small_mlp, probe, bridge=True)
    assert [(t.step_from, t.step_to, t.bridged) for t in bridged.transitions] == [
        (0, 1, False),
        (1, 3, True),
        (3, 4, False),
        (4, 5, False),
    ]
    assert all("bridged by 1 → 3" in m.reason for m in bridged.missing)

    with pytest.raises(CheckpointError, match=r"step_2\.pt: corrupt"):
        analyze(tmp_path, small_mlp, probe, strict=True)


def test_mismatching_and_missing_checkpoints_in_an_explicit_list(tmp_path, monitor_run) -> None:
    wide = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    torch.save(wide.state_dict(), tmp_path / "step_9.pt")
    files = [monitor_run.files[0], monitor_run.files[1], tmp_path / "step_9.pt", tmp_path / "step_10.pt"]
    result = analyze([*files, monitor_run.files[2]], small_mlp, Probe(monitor_run.x, monitor_run.y))
    # the list's order is kept; the steps come from the names (all numbered, all distinct)
    errors = {c.path: c.error for c in result.checkpoints if not c.ok}
    assert "shapes differ" in errors[str(tmp_path / "step_9.pt")]
    assert errors[str(tmp_path / "step_10.pt")] == "no such file"
    assert len(result.transitions) == 1 and len(result.missing) == 3


def test_no_usable_checkpoints(tmp_path, monitor_run) -> None:
    with pytest.raises(NoCheckpointsError, match="no checkpoints in"):
        analyze(tmp_path, small_mlp, Probe(monitor_run.x))
    torch.save(nn.Linear(3, 3).state_dict(), tmp_path / "step_1.pt")
    (tmp_path / "step_2.pt").write_bytes(monitor_run.files[0].read_bytes())
    with pytest.raises(
        NoCheckpointsError, match=r"1 of 2 checkpoints could be used.*step_1\.pt: does not match"
    ):
        analyze(tmp_path, small_mlp, Probe(monitor_run.x))


# ---------------------------------------------------------------- probe and factory


def test_probe_files_and_their_errors(tmp_path, monitor_run) -> None:
    digits = load_probe("digits")
    assert digits.size == 1438 and digits.name == "digits:train"
    assert load_probe("digits:test").size == 359
    with pytest.raises(ProbeError, match=r"nope\.pt: no such file"):
        load_probe(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ProbeError, match=r"junk\.pt: cannot be read"):
        load_probe(tmp_path / "junk.pt")
    torch.save({"x": monitor_run.x}, tmp_path / "nox.pt")
    with pytest.raises(ProbeError, match=r"nox\.pt: expected a dict with 'inputs'"):
        load_probe(tmp_path / "nox.pt")
    torch.save({"inputs": monitor_run.x, "target": monitor_run.y}, tmp_path / "typo.pt")
    with pytest.raises(ProbeError, match=r"typo\.pt: unknown keys \['target'\]"):
        load_probe(tmp_path / "typo.pt")
    torch.save({"inputs": monitor_run.x, "targets": monitor_run.y[:5]}, tmp_path / "short.pt")
    with pytest.raises(
        ProbeError, match=r"short\.pt: 'targets' has shape \(5,\) but the inputs hold 96 samples"
    ):
        load_probe(tmp_path / "short.pt")


def test_a_probe_that_does_not_fit_the_model(tmp_path, monitor_run) -> None:
    torch.save({"inputs": torch.rand(8, 32)}, tmp_path / "narrow.pt")
    with pytest.raises(
        ProbeError,
        match=r"narrow\.pt does not fit the model: its forward on Tensor\(8, 32\) float32 raised RuntimeError",
    ):
        analyze(monitor_run.ckpt_dir, small_mlp, load_probe(tmp_path / "narrow.pt"))
    torch.save({"inputs": torch.rand(8, 64), "targets": torch.full((8,), 12)}, tmp_path / "classes.pt")
    with pytest.raises(
        ProbeError, match=r"classes\.pt: targets range over \[12, 12\] but the model has 10 outputs"
    ):
        analyze(monitor_run.ckpt_dir, small_mlp, load_probe(tmp_path / "classes.pt"))


def test_model_factories_and_their_errors(tmp_path, factory_file) -> None:
    assert isinstance(load_factory("stepguard.demo:digits_mlp")(), nn.Module)
    assert isinstance(load_factory(f"{factory_file}:build")(), nn.Sequential)
    with pytest.raises(FactoryError, match=r"expected 'pkg\.module:factory'"):
        load_factory("stepguard.demo.digits_mlp")
    with pytest.raises(FactoryError, match=r"cannot import module 'no_such_pkg\.models'"):
        load_factory("no_such_pkg.models:build")
    with pytest.raises(FactoryError, match=r"stepguard\.demo has no attribute 'nothing'"):
        load_factory("stepguard.demo:nothing")
    with pytest.raises(FactoryError, match=r"no such file .*absent\.py"):
        load_factory(f"{tmp_path / 'absent.py'}:build")
    broken = tmp_path / "broken.py"
    broken.write_text("import not_a_module_anywhere\n")
    with pytest.raises(FactoryError, match=r"running .*broken\.py raised ModuleNotFoundError"):
        load_factory(f"{broken}:build")
    with pytest.raises(FactoryError, match="not a callable"):
        load_factory("stepguard.demo:__doc__")
    with pytest.raises(FactoryError, match=r"returned a int, not a torch\.nn\.Module"):
        build_model(lambda: 3)
    with pytest.raises(FactoryError, match="raised TypeError"):
        build_model(lambda: nn.Linear())


def test_flips_and_cld_need_targets_and_a_validation_probe(monitor_run) -> None:
    with pytest.raises(AnalysisError, match="need targets"):
        analyze(monitor_run.ckpt_dir, small_mlp, Probe(monitor_run.x), flips=True)
    with pytest.raises(AnalysisError, match="validation probe"):
        analyze(monitor_run.ckpt_dir, small_mlp, Probe(monitor_run.x, monitor_run.y), cld=True)


# ---------------------------------------------------------------- flips and CLD through the replay


def _eval_losses(files, x, y):
    losses, correct = [], []
    for f in files:
        model = small_mlp()
        model.load_state_dict(torch.load(f))
        model.eval()
        with torch.no_grad():
            z = model(x).double()
        losses.append(F.cross_entropy(z, y, reduction="none"))
        correct.append(z.argmax(1) == y)
    return torch.stack(losses), correct


def test_flips_and_cld_of_a_run_against_a_direct_computation(monitor_run) -> None:
    x, y = monitor_run.x, monitor_run.y
    vx, vy = x[:48] * 0.9, y[:48]
    result = analyze(
        monitor_run.ckpt_dir,
        small_mlp,
        Probe(x, y),
        validation=Probe(vx, vy),
        flips=True,
        cld=True,
        cld_fraction=0.25,
    )
    train_losses, correct = _eval_losses(monitor_run.files, x, y)
    val_losses, _ = _eval_losses(monitor_run.files, vx, vy)
    for t, (a, b) in zip(result.transitions, itertools.pairwise(correct), strict=True):
        flips = int((a & ~b).sum())
        assert t.report.extras["negative_flips"] == flips
        assert t.report.extras["negative_flip_rate"] == pytest.approx(flips / len(y))
        assert "val_loss" in t.report.extras and "val_accuracy" in t.report.extras
    from stepguard.analysis import cld_ranking, cld_scores

    expected = cld_scores(train_losses, y, val_losses, vy)
    assert result.cld is not None and result.cld.checkpoints == 6
    assert result.cld.scores == pytest.approx(expected.tolist(), abs=1e-9, nan_ok=True)
    assert result.cld.ranking == cld_ranking(expected, y)
    sizes = [math.ceil(0.25 * len(m)) for m in result.cld.ranking.values()]
    assert len(result.cld.coreset) == sum(sizes)


def test_cld_with_too_few_checkpoints_is_skipped_with_a_note(monitor_run) -> None:
    probe = Probe(monitor_run.x, monitor_run.y)
    result = analyze(monitor_run.files[:2], small_mlp, probe, validation=probe, cld=True)
    assert result.cld is None and "3 or more usable checkpoints" in result.notes[0]


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(12, 8)
        self.head = nn.Linear(8, 12)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(tokens)))


def test_sequence_outputs_with_mask_and_ignored_positions(tmp_path) -> None:
    torch.manual_seed(0)
    tokens = torch.randint(0, 12, (6, 5))
    targets = torch.randint(0, 12, (6, 5))
    targets[:, 0] = -100
    mask = torch.ones(6, 5, dtype=torch.bool)
    mask[:, -1] = False
    model = TinyLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    files = []
    for k in range(3):
        files.append(tmp_path / f"lm_{k}.pt")
        torch.save(model.state_dict(), files[-1])
        loss = F.cross_entropy(model(tokens).reshape(-1, 12), targets.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    probe = Probe(tokens, targets, mask)
    result = analyze(files, TinyLM, probe, validation=probe, flips=True, cld=True)
    kept = {int(i) for i in (mask & (targets != -100)).reshape(-1).nonzero().squeeze(1)}
    assert result.transitions[0].report.spread.count == len(kept) == 18
    for t in result.transitions:
        assert set(t.report.binding) <= kept
        assert len(t.binding_radii) == len(t.report.binding)
        assert 0 <= t.report.extras["negative_flip_rate"] <= 1
    assert result.cld is None and "one row of logits per sample" in result.notes[0]


def test_device_choice() -> None:
    from stepguard.analysis.replay import resolve_device

    assert resolve_device(None).type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(AnalysisError, match="CUDA is not available"):
            resolve_device("cuda")
