"""Hugging Face Trainer: the callback guards the Trainer's optimizer and logs through it."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from stepguard import StepGuard  # noqa: E402
from stepguard.integrations.transformers import (  # noqa: E402
    DEFAULT_MAX_REPORTS,
    STATE_FILE,
    StepGuardCallback,
)


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
    callback = StepGuardCallback(policy="clip")
    trainer = make_trainer(tmp_path, callback, max_steps=5)
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


def make_trainer(tmp_path, callback, *, max_steps=5, learning_rate=5.0, **overrides):
    """A one-layer GPT-2 on random tokens under ``callback`` (CPU, no download)."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    settings = dict(
        output_dir=str(tmp_path),
        max_steps=max_steps,
        per_device_train_batch_size=8,
        learning_rate=learning_rate,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        lr_scheduler_type="constant",
        warmup_steps=0,
        disable_tqdm=True,
    )
    args = transformers.TrainingArguments(**(settings | overrides))
    return transformers.Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[callback])


class Recording:
    """A sink that keeps the steps it received and what was called on it."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.flushed = 0
        self.closed = False

    def write(self, report) -> None:
        self.steps.append(report.step)

    def flush(self) -> None:
        self.flushed += 1

    def close(self) -> None:
        self.closed = True


def test_a_second_train_on_the_same_trainer_is_guarded_and_its_steps_continue(tmp_path) -> None:
    sink = Recording()
    callback = StepGuardCallback(policy="clip", sinks=[sink])
    trainer = make_trainer(tmp_path, callback, max_steps=3)
    trainer.train()
    assert sink.flushed and not sink.closed  # flushed at the end of train(), still open
    trainer.train()
    assert [r.step for r in callback.reports] == list(range(6))
    assert all(r.action == "clip" for r in callback.reports)
    assert sink.steps == list(range(6))
    assert callback.handle.counters["clip"] == 6
    assert not callback.handle.attached  # no hooks left on the optimizer between runs
    logged = [entry for entry in trainer.state.log_history if "stepguard/r" in entry]
    assert [entry["stepguard/r"] for entry in logged] == pytest.approx([r.r for r in callback.reports][3:])
    callback.close()
    assert sink.closed


def test_logged_windows_carry_r_max_and_the_clip_count_of_every_step(tmp_path) -> None:
    callback = StepGuardCallback(policy="clip")
    trainer = make_trainer(tmp_path, callback, max_steps=5, logging_steps=2)
    trainer.train()
    reports = list(callback.reports)
    logged = [entry for entry in trainer.state.log_history if "stepguard/r" in entry]
    windows = [reports[0:2], reports[2:4], reports[4:5]]  # the last one is logged at the end
    assert len(logged) == len(windows)
    for entry, window in zip(logged, windows, strict=True):
        assert entry["stepguard/r"] == pytest.approx(window[-1].r)
        assert entry["stepguard/r_max"] == pytest.approx(max(r.r for r in window))
        assert entry["stepguard/clipped"] == sum(r.action == "clip" for r in window)


@pytest.mark.slow  # two Trainer runs and their checkpoints
def test_resume_from_a_checkpoint_continues_the_guards_steps_and_counters(tmp_path) -> None:
    first = StepGuardCallback(policy="clip")
    make_trainer(tmp_path, first, max_steps=4, save_strategy="steps", save_steps=2).train()
    checkpoint = tmp_path / "checkpoint-2"
    saved = json.loads((checkpoint / STATE_FILE).read_text())
    assert saved["step"] == 2 and saved["counters"]["clip"] == 2

    resumed = StepGuardCallback(policy="clip")
    make_trainer(tmp_path, resumed, max_steps=4).train(resume_from_checkpoint=str(checkpoint))
    assert [r.step for r in resumed.reports] == [2, 3]
    assert resumed.handle.counters["clip"] == 4


@pytest.mark.slow  # two Trainer runs and their checkpoints
def test_resume_from_a_checkpoint_without_guard_state_takes_the_global_step(tmp_path, caplog) -> None:
    make_trainer(tmp_path, StepGuardCallback(), max_steps=4, save_strategy="steps", save_steps=2).train()
    checkpoint = tmp_path / "checkpoint-2"
    (checkpoint / STATE_FILE).unlink()
    resumed = StepGuardCallback(policy="clip")
    with caplog.at_level(logging.WARNING, logger="stepguard"):
        make_trainer(tmp_path, resumed, max_steps=4).train(resume_from_checkpoint=str(checkpoint))
    assert [r.step for r in resumed.reports] == [2, 3]
    assert STATE_FILE in caplog.text and "global step 2" in caplog.text


def test_stored_reports_are_bounded(tmp_path) -> None:
    callback = StepGuardCallback(policy="clip", max_reports=2)
    make_trainer(tmp_path, callback, max_steps=5).train()
    assert [r.step for r in callback.reports] == [3, 4]
    assert StepGuardCallback().reports.maxlen == DEFAULT_MAX_REPORTS


@pytest.mark.parametrize("bad", [0, -1, 2.5])
def test_max_reports_must_be_a_positive_int(bad) -> None:
    with pytest.raises(ValueError, match="max_reports must be a positive int"):
        StepGuardCallback(max_reports=bad)


@pytest.mark.parametrize("wrapped", [False, True], ids=["bare", "accelerate-wrapped"])
def test_a_trainer_optimizer_that_is_already_a_step_guard_is_refused(wrapped) -> None:
    net = torch.nn.Linear(4, 3)
    guard = StepGuard(torch.optim.SGD(net.parameters(), lr=0.1), model=net)
    optimizer = SimpleNamespace(optimizer=guard) if wrapped else guard
    with pytest.raises(TypeError, match="already a StepGuard"):
        StepGuardCallback().on_train_begin(None, None, None, model=net, optimizer=optimizer)
