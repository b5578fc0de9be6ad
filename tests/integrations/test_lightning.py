"""Lightning: the callback guards the optimizer Lightning owns, closure and all."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pl = pytest.importorskip("lightning.pytorch")

from stepguard.integrations.lightning import StepGuardCallback  # noqa: E402


class Classifier(pl.LightningModule):
    def __init__(self, spike_at: int, spike: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
        self.spike_at, self.spike = spike_at, spike

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=1e-3)
        spike_at, spike = self.spike_at, self.spike
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: spike if step >= spike_at else 1.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def test_callback_clips_the_spiked_steps_of_a_lightning_run(tmp_path) -> None:
    torch.manual_seed(0)
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    module = Classifier(spike_at=4, spike=10_000.0)
    callback = StepGuardCallback(policy="clip")
    trainer = pl.Trainer(
        max_steps=8,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
        default_root_dir=tmp_path,
    )
    trainer.fit(module, loader)
    reports = callback.reports
    assert len(reports) == 8
    assert all(r.action == "allow" for r in reports[:4])
    assert all(r.action == "clip" for r in reports[4:])
    for r in reports[4:]:
        assert r.applied_tau == pytest.approx(r.rho_a, rel=1e-9)
    assert all(r.spread.count == 16 for r in reports)  # measured on the captured batch
    assert reports[0].loss is not None  # the closure's loss
    assert trainer.callback_metrics["stepguard/r"] == pytest.approx(reports[-1].r, rel=1e-6)
    assert torch.isfinite(torch.cat([p.detach().flatten() for p in module.parameters()])).all()
