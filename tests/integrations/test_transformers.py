"""Hugging Face Trainer: the callback guards the Trainer's optimizer and logs through it."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from stepguard.integrations.transformers import StepGuardCallback  # noqa: E402


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 32, length: int = 12, vocab: int = 40) -> None:
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, length), generator=gen)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        labels = self.ids[i].clone()
        labels[:3] = -100  # a prompt that carries no loss
        return {"input_ids": self.ids[i], "labels": labels}


def test_trainer_steps_are_guarded_and_logged(tmp_path) -> None:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    model = transformers.GPT2LMHeadModel(config)  # random init: no download
    callback = StepGuardCallback(policy="clip")
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=5,
        per_device_train_batch_size=8,
        learning_rate=5.0,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        lr_scheduler_type="constant",
        warmup_steps=0,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[callback])
    trainer.train()
    reports = callback.reports
    assert len(reports) == 5
    assert all(r.action == "clip" for r in reports)  # lr 5.0 is far outside the radius
    assert all(r.applied_tau == pytest.approx(r.rho_a, rel=1e-6) for r in reports)
    # counted rows: positions whose next token carries a label, as the LM loss shifts them:
    # labels[:, 1:] != -100 holds for 9 of 11 positions in each of the 8 samples
    assert all(r.spread.count == 8 * 9 for r in reports)
    logged = [entry for entry in trainer.state.log_history if "stepguard/r" in entry]
    assert len(logged) == 5
    assert logged[-1]["stepguard/r"] == pytest.approx(reports[-1].r)
    assert sum(entry["stepguard/clipped"] for entry in logged) == 5
