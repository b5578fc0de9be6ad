"""A small Hugging Face Llama trained by a Lightning ``Trainer`` with FSDP2, guarded by StepGuard.

The LightningModule applies ``fully_shard`` in ``configure_model`` (to every decoder layer
and to the root, on the data-parallel dimension of the strategy's device mesh) and returns
a plain AdamW over the sharded parameters from ``configure_optimizers``. The Trainer's
``StepGuardCallback(policy="clip", model_fn=lambda m: m.model)`` wraps it in a guard when
fitting starts, so the guard is the optimizer Lightning holds: Lightning calls
``guard.step(closure=...)``, the inner AdamW runs the closure (training_step and backward),
and the guard measures and clips the update it proposes. The model, data and learning-rate
spike are those of ``examples/fsdp2_llama.py``: next-byte prediction on the text of
``pydoc_data.topics``, the learning rate multiplied by ``--spike`` from step ``--spike-at``
on. Lightning's distributed sampler gives each rank its own part of every global batch.

Run on two CPU processes (gloo), launched by Lightning itself::

    python examples/lightning_fsdp2.py --steps 30

Lightning starts the second process by running this script again with the same arguments,
so run it as a script, not from an interactive session. ``--json FILE`` writes every rank's
per-step reports (loss, r, τ, action, scale) and counters. ``--checkpoint DIR`` saves the
strategy's sharded checkpoint at the end, where the callback puts the guard's own state
(steps, counters, policy state) in the metadata; ``--resume DIR`` continues from one, the
guard's steps and counters included::

    python examples/lightning_fsdp2.py --steps 20 --checkpoint ckpt
    python examples/lightning_fsdp2.py --steps 30 --resume ckpt

``--epoch-batches N`` makes the data repeat after N global batches (an epoch). A resumed run
need not see the batches an uninterrupted run would have seen (where Lightning resumes in the
data is its own); with ``--epoch-batches 1`` every step trains on the same batch, so the two
can be compared step by step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from _tiny_llama import add_llama_arguments, corpus, tiny_llama
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader, Dataset

from stepguard.integrations.lightning import StepGuardCallback


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_llama_arguments(parser)
    parser.add_argument("--devices", type=int, default=2, help="CPU processes (default 2)")
    parser.add_argument(
        "--epoch-batches",
        type=int,
        default=0,
        help="global batches per epoch; the data repeats after them (default: --steps)",
    )
    parser.add_argument("--json", metavar="FILE", help="write every rank's per-step reports here")
    parser.add_argument("--checkpoint", metavar="DIR", help="save a sharded checkpoint here at the end")
    parser.add_argument("--resume", metavar="DIR", help="continue from a checkpoint saved with --checkpoint")
    args = parser.parse_args(argv)
    if args.devices < 1 or args.steps < 1 or args.batch < 1 or args.seq < 2 or args.epoch_batches < 0:
        parser.error(
            "--devices, --steps and --batch must be at least 1, --seq at least 2 and "
            "--epoch-batches not negative"
        )
    args.epoch_batches = args.epoch_batches or args.steps
    return args


class Windows(Dataset):
    """``count`` windows of ``seq`` bytes; window ``i`` starts at an offset drawn from seed ``i``."""

    def __init__(self, count: int, seq: int) -> None:
        self.data = corpus()
        self.count = count
        self.seq = seq

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(index)
        start = int(torch.randint(0, len(self.data) - self.seq, (1,), generator=gen))
        return self.data[start : start + self.seq]


class GuardedLlama(pl.LightningModule):
    """A tiny ``LlamaForCausalLM``, sharded in ``configure_model``, stepped by a StepGuard."""

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__()
        self.args = args
        self.model = tiny_llama(args)
        self.rows: list[dict[str, Any]] = []
        self.everyone: list[Any] = []

    def configure_model(self) -> None:
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if isinstance(self.model, FSDPModule):  # Lightning calls this hook again for each stage
            return
        mesh = self.device_mesh["data_parallel"]  # 1-D: the guard refuses 2-D meshes
        for layer in self.model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.model.parameters(), lr=self.args.lr, weight_decay=0.0)

    @property
    def guard(self) -> Any:
        """The StepGuard the callback put in the AdamW's place when fitting started."""
        return self.trainer.optimizers[0]

    def on_train_batch_start(self, batch: torch.Tensor, batch_idx: int) -> None:
        factor = self.args.spike if self.global_step >= self.args.spike_at else 1.0
        for group in self.guard.param_groups:
            group["lr"] = self.args.lr * factor

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.model(input_ids=batch, labels=batch).loss
        self._loss = loss.detach()
        return loss

    def on_train_batch_end(self, outputs: Any, batch: torch.Tensor, batch_idx: int) -> None:
        report = self.guard.last_report
        self.rows.append(
            {
                "step": report.step,
                "loss": self._loss.item(),
                "r": report.r,
                "tau": report.tau,
                "action": report.action,
                "scale": report.scale,
            }
        )

    def on_train_end(self) -> None:
        # Gathered here, while the strategy's process group is still up.
        self.everyone = [None] * dist.get_world_size()
        dist.all_gather_object(
            self.everyone, {"rank": dist.get_rank(), "rows": self.rows, "counters": self.guard.counters}
        )


def _decisions(rank: dict[str, Any]) -> list[tuple]:
    """What every rank must share: the reduced numbers and the action of each step (not the loss)."""
    return [(row["r"], row["tau"], row["action"], row["scale"]) for row in rank["rows"]]


def print_table(everyone: list[dict[str, Any]], spike_at: int) -> None:
    print(f"{'step':>4}  {'loss':>7}  {'r':>9}  action")
    for row in everyone[0]["rows"]:
        mark = "   <- LR spike" if row["step"] == spike_at else ""
        print(f"{row['step']:>4}  {row['loss']:7.3f}  {row['r']:9.3g}  {row['action']}{mark}")
    agree = all(_decisions(e) == _decisions(everyone[0]) for e in everyone)
    print(f"ranks: {len(everyone)}; same r and decisions on every rank: {'yes' if agree else 'NO'}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # every rank on this machine
    torch.set_num_threads(1)
    module = GuardedLlama(args)
    loader = DataLoader(
        Windows(args.epoch_batches * args.batch * args.devices, args.seq), batch_size=args.batch
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=ModelParallelStrategy(data_parallel_size=args.devices, tensor_parallel_size=1),
        max_steps=args.steps,
        callbacks=[StepGuardCallback(policy="clip", model_fn=lambda m: m.model)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader, ckpt_path=args.resume)
    if args.checkpoint:
        trainer.save_checkpoint(args.checkpoint)
    if trainer.global_rank == 0:
        print_table(module.everyone, args.spike_at)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"ranks": module.everyone}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
