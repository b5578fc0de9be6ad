"""Lightning: the callback guards the optimizer Lightning owns, closure and all."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pl = pytest.importorskip("lightning.pytorch")

from lightning.pytorch.loggers import Logger  # noqa: E402

from stepguard.integrations.lightning import DEFAULT_MAX_REPORTS, StepGuardCallback  # noqa: E402


class Classifier(pl.LightningModule):
    """Adam on a small MLP; the LR is multiplied by ``spike`` at the steps ``spiked(step)`` says."""

    def __init__(
        self, spiked=lambda step: False, spike: float = 10_000.0, optimizer: str = "adam", lr: float = 1e-3
    ) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
        self.spiked, self.spike, self.optimizer, self.lr = spiked, spike, optimizer, lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        if self.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr)
        opt = torch.optim.Adam(self.parameters(), lr=self.lr)
        spiked, spike = self.spiked, self.spike
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: spike if spiked(step) else 1.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class Recorder(Logger):
    """A logger that keeps every ``log_metrics`` call as ``(step, metrics)``."""

    def __init__(self) -> None:
        super().__init__()
        self.entries: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics, step=None) -> None:
        self.entries.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def guard_entries(self) -> list[tuple[int | None, dict[str, float]]]:
        return [
            (step, metrics)
            for step, metrics in self.entries
            if any(name.startswith("stepguard/") for name in metrics)
        ]


def loader(n: int = 64, batch_size: int = 16) -> torch.utils.data.DataLoader:
    torch.manual_seed(0)
    x, y = torch.randn(n, 8), torch.randint(0, 3, (n,))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)


def make_trainer(tmp_path, callback, *, max_steps: int, **overrides) -> pl.Trainer:
    settings = dict(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
        default_root_dir=tmp_path,
    )
    return pl.Trainer(**(settings | overrides))


def test_callback_clips_the_spiked_steps_of_a_lightning_run(tmp_path) -> None:
    module = Classifier(spiked=lambda step: step >= 4)
    callback = StepGuardCallback(policy="clip")
    trainer = make_trainer(tmp_path, callback, max_steps=8, log_every_n_steps=4)
    trainer.fit(module, loader())
    reports = list(callback.reports)
    assert len(reports) == 8
    assert all(r.action == "allow" for r in reports[:4])
    assert all(r.action == "clip" for r in reports[4:])
    for r in reports[4:]:
        assert r.applied_tau == pytest.approx(r.rho_a, rel=1e-9)
    assert all(r.spread.count == 16 for r in reports)  # measured on the captured batch
    assert reports[0].loss is not None  # the closure's loss
    assert trainer.callback_metrics["stepguard/r"] == pytest.approx(reports[-1].r, rel=1e-6)
    assert trainer.callback_metrics["stepguard/clipped"] == 4
    assert torch.isfinite(torch.cat([p.detach().flatten() for p in module.parameters()])).all()


def test_every_step_reaches_the_logger_aggregated_per_logging_window(tmp_path) -> None:
    module = Classifier(spiked=lambda step: step == 5)  # one clipped step, between two log points
    callback = StepGuardCallback(policy="clip")
    recorder = Recorder()
    trainer = make_trainer(tmp_path, callback, max_steps=10, log_every_n_steps=4, logger=recorder)
    trainer.fit(module, loader(n=160))
    reports = list(callback.reports)
    assert [r.action for r in reports] == ["allow"] * 5 + ["clip"] + ["allow"] * 4
    entries = recorder.guard_entries()
    # Lightning logs at steps 3 and 7; the callback adds the steps after the last log point
    windows = {3: reports[0:4], 7: reports[4:8], 9: reports[8:10]}
    assert [step for step, _ in entries] == list(windows)
    for step, metrics in entries:
        window = windows[step]
        assert metrics["stepguard/r"] == pytest.approx(window[-1].r, rel=1e-6)
        assert metrics["stepguard/r_max"] == pytest.approx(max(r.r for r in window), rel=1e-6)
        assert metrics["stepguard/clipped"] == sum(r.action == "clip" for r in window)
        assert metrics["stepguard/vetoed"] == 0
    spiked = entries[1][1]
    assert spiked["stepguard/clipped"] == 1 and spiked["stepguard/r_max"] > 1 > spiked["stepguard/r"]


def test_the_guard_measures_the_update_of_the_gradients_lightning_clipped(tmp_path) -> None:
    """Lightning clips inside the closure, which the optimizer runs inside the guarded step."""
    taus = {}
    for clip in (None, 1e-3):
        callback = StepGuardCallback(policy="monitor")
        trainer = make_trainer(tmp_path, callback, max_steps=3, gradient_clip_val=clip)
        trainer.fit(Classifier(optimizer="sgd", lr=1.0), loader())
        taus[clip] = [r.tau for r in callback.reports]
        if clip is not None:
            # plain SGD with lr 1: Δθ = -g, so τ is the norm of the gradient the optimizer used
            assert taus[clip] == pytest.approx([clip] * 3, rel=1e-4)
            assert [r.grad_norm for r in callback.reports] == pytest.approx([clip] * 3, rel=1e-4)
    assert min(taus[None]) > 100 * 1e-3  # unclipped, the same steps are far longer


class TwoNets(pl.LightningModule):
    """Two networks, each with its own optimizer, stepped by hand (as a GAN does)."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.a = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
        self.b = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 5))

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt_a, opt_b = self.optimizers()
        opt_a.zero_grad()
        self.manual_backward(F.cross_entropy(self.a(x), y))
        opt_a.step()
        opt_b.zero_grad()
        self.manual_backward(F.cross_entropy(self.b(x[:8]), (y[:8] + 1) % 5))
        opt_b.step()

    def configure_optimizers(self):
        return [torch.optim.Adam(self.a.parameters(), lr=1e-3), torch.optim.SGD(self.b.parameters(), lr=0.1)]


def test_each_optimizer_is_measured_on_its_own_network(tmp_path) -> None:
    module = TwoNets()
    callback = StepGuardCallback(
        policy="monitor",
        model_fn={0: lambda m: m.a, 1: lambda m: m.b},
        targets_fn=[lambda batch: batch[1], lambda batch: (batch[1][:8] + 1) % 5],
    )
    recorder = Recorder()
    trainer = make_trainer(tmp_path, callback, max_steps=6, log_every_n_steps=1, logger=recorder)
    trainer.fit(module, loader())
    first, second = callback.guards
    assert first.engine.model is module.a and second.engine.model is module.b
    a_reports, b_reports = callback.optimizer_reports
    assert [r.step for r in a_reports] == [r.step for r in b_reports] == [0, 1, 2]
    assert all(r.spread.count == 16 for r in a_reports)  # net a saw the whole batch
    assert all(r.spread.count == 8 for r in b_reports)  # net b saw half of it
    assert all(r.rho_top2 is not None for r in b_reports)  # its own targets reached it
    assert len(callback.reports) == 6
    metrics = recorder.guard_entries()[-1][1]
    assert metrics["stepguard/r_0"] == pytest.approx(a_reports[-1].r, rel=1e-6)
    assert metrics["stepguard/r_1"] == pytest.approx(b_reports[-1].r, rel=1e-6)


def fake_trainer(count: int) -> SimpleNamespace:
    nets = [nn.Linear(2, 2) for _ in range(count)]
    optimizers = [torch.optim.SGD(net.parameters(), lr=0.1) for net in nets]
    return SimpleNamespace(strategy=SimpleNamespace(optimizers=optimizers))


@pytest.mark.parametrize(
    ("model_fn", "error", "match"),
    [
        ({0: lambda m: m}, ValueError, r"maps optimizer indices \[0\].*2 optimizer"),
        ({0: lambda m: m, 1: lambda m: m, 2: lambda m: m}, ValueError, "exactly one entry per index"),
        ([lambda m: m], ValueError, "model_fn has 1 entries, but the module has 2"),
        (lambda m: "not a module", TypeError, "model_fn for optimizer 0 returned str"),
        (42, TypeError, "model_fn must be a function, a mapping"),
    ],
)
def test_a_model_fn_that_does_not_fit_the_optimizers_is_refused(model_fn, error, match) -> None:
    callback = StepGuardCallback(model_fn=model_fn)
    with pytest.raises(error, match=match):
        callback.on_fit_start(fake_trainer(2), nn.Linear(2, 2))


def test_a_module_given_as_model_fn_is_refused() -> None:
    with pytest.raises(TypeError, match=r"lambda m: m\.net, not a module"):
        StepGuardCallback(model_fn=nn.Linear(2, 2))


def test_resuming_from_a_checkpoint_continues_the_guards_steps_and_counters(tmp_path) -> None:
    spiked = lambda step: step % 2 == 1  # noqa: E731
    first = StepGuardCallback(policy="clip")
    trainer = make_trainer(tmp_path, first, max_steps=4)
    trainer.fit(Classifier(spiked=spiked), loader())
    trainer.save_checkpoint(tmp_path / "four.ckpt")

    resumed = StepGuardCallback(policy="clip")
    make_trainer(tmp_path, resumed, max_steps=6).fit(
        Classifier(spiked=spiked), loader(), ckpt_path=tmp_path / "four.ckpt"
    )
    assert [r.step for r in resumed.reports] == [4, 5]
    assert resumed.guards[0].counters == {"allow": 3, "clip": 3, "veto": 0}


def test_a_checkpoint_without_guard_state_resumes_at_the_global_step(tmp_path, caplog) -> None:
    trainer = make_trainer(tmp_path, StepGuardCallback(), max_steps=4)
    trainer.fit(Classifier(), loader())
    trainer.save_checkpoint(tmp_path / "four.ckpt")
    checkpoint = torch.load(tmp_path / "four.ckpt", weights_only=False)
    for state in checkpoint["optimizer_states"]:
        state.pop("stepguard")
    checkpoint.pop("stepguard")
    torch.save(checkpoint, tmp_path / "plain.ckpt")

    resumed = StepGuardCallback()
    with caplog.at_level(logging.WARNING, logger="stepguard"):
        make_trainer(tmp_path, resumed, max_steps=6).fit(
            Classifier(), loader(), ckpt_path=tmp_path / "plain.ckpt"
        )
    assert [r.step for r in resumed.reports] == [4, 5]
    assert "global step 4" in caplog.text


def test_the_guards_state_is_restored_from_the_top_level_entry_when_the_optimizers_lack_it(
    tmp_path,
) -> None:
    # As ModelParallelStrategy saves: get_optimizer_state_dict drops the optimizers' "stepguard".
    spiked = lambda step: step % 2 == 1  # noqa: E731
    first = StepGuardCallback(policy="clip")
    trainer = make_trainer(tmp_path, first, max_steps=4)
    trainer.fit(Classifier(spiked=spiked), loader())
    trainer.save_checkpoint(tmp_path / "four.ckpt")
    checkpoint = torch.load(tmp_path / "four.ckpt", weights_only=False)
    assert checkpoint["stepguard"] == [first.guards[0].engine.state_dict()]
    assert checkpoint["stepguard"][0]["counters"] == {"allow": 2, "clip": 2, "veto": 0}
    for state in checkpoint["optimizer_states"]:
        state.pop("stepguard")
    torch.save(checkpoint, tmp_path / "top.ckpt")

    resumed = StepGuardCallback(policy="clip")
    make_trainer(tmp_path, resumed, max_steps=6).fit(
        Classifier(spiked=spiked), loader(), ckpt_path=tmp_path / "top.ckpt"
    )
    assert [r.step for r in resumed.reports] == [4, 5]
    assert resumed.guards[0].counters == {"allow": 3, "clip": 3, "veto": 0}


def test_the_optimizer_states_copy_wins_over_the_top_level_entry(tmp_path) -> None:
    trainer = make_trainer(tmp_path, StepGuardCallback(policy="clip"), max_steps=4)
    trainer.fit(Classifier(spiked=lambda step: step % 2 == 1), loader())
    trainer.save_checkpoint(tmp_path / "four.ckpt")
    checkpoint = torch.load(tmp_path / "four.ckpt", weights_only=False)
    # Make the two copies differ, to see which one the resumed guard continues from.
    checkpoint["stepguard"][0] |= {"step": 40, "counters": {"allow": 40, "clip": 0, "veto": 0}}
    torch.save(checkpoint, tmp_path / "both.ckpt")

    resumed = StepGuardCallback(policy="clip")
    make_trainer(tmp_path, resumed, max_steps=6).fit(Classifier(), loader(), ckpt_path=tmp_path / "both.ckpt")
    assert [r.step for r in resumed.reports] == [4, 5]
    assert resumed.guards[0].counters == {"allow": 4, "clip": 2, "veto": 0}


def test_a_second_fit_is_guarded_and_continues_the_steps(tmp_path) -> None:
    module = Classifier()
    callback = StepGuardCallback(policy="monitor")
    make_trainer(tmp_path, callback, max_steps=2).fit(module, loader())
    first_guard = callback.guards[0]
    make_trainer(tmp_path, callback, max_steps=2).fit(module, loader())
    assert [r.step for r in callback.reports] == [0, 1, 2, 3]
    assert callback.guards[0] is not first_guard
    assert not module._forward_pre_hooks  # the finished fits left no capture hook behind


def test_stored_reports_are_bounded(tmp_path) -> None:
    callback = StepGuardCallback(max_reports=2)
    make_trainer(tmp_path, callback, max_steps=4).fit(Classifier(), loader())
    assert [r.step for r in callback.reports] == [2, 3]
    assert [r.step for r in callback.optimizer_reports[0]] == [2, 3]
    assert StepGuardCallback().reports.maxlen == DEFAULT_MAX_REPORTS
    with pytest.raises(ValueError, match="max_reports must be a positive int"):
        StepGuardCallback(max_reports=0)
