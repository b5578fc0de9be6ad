"""The workloads of ``stepguard compare``: small models, their data, their loss and their evaluation.

Every workload is deterministic given a seed (initial weights, batch order) and needs no
download:

* ``digits-mlp`` — the demo's MLP (64-128-10, ReLU) on the digits shipped in the package,
  batches of 64, 200 steps; scored by test accuracy.
* ``grid-transformer``, ``grid-mlp-ln``, ``grid-cnn-bn`` — the three models of the
  "Ghosts of Softmax" architecture grid (Table 1): a one-token Transformer, an MLP with
  LayerNorm and a CNN with BatchNorm, trained full-batch on the digits in file order
  (the first 20 % test), batches of 128 (the paper trains full-batch), 150 steps; scored by
  test accuracy in eval mode.
* ``byte-lm`` — a causal transformer language model (2 pre-norm blocks, width 64,
  4 heads, no dropout, context 32) over bytes (vocabulary 256) of the English
  documentation text that ships with Python (:mod:`pydoc_data.topics`, about 0.47 MB);
  the last 10 % of the text is held out; batches of 16 × 32 bytes, 150 steps; scored by
  validation loss (nats per byte).
* ``llama`` — a Hugging Face ``LlamaForCausalLM`` built from a tiny config (2 layers,
  hidden 64, 4 heads, intermediate 128, byte vocabulary 256) on the same text and split.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stepguard.datasets import Split, digits_split, load_digits, minibatches
from stepguard.demo import digits_mlp
from stepguard.tools.bench_models import TinyLM

# --------------------------------------------------------------------------- the grid's models


class OneTokenTransformer(nn.Module):
    """One pre-LN Transformer block on a single token: embed 64→dim, attention, GELU FFN (4·dim), head."""

    def __init__(self, dim: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Linear(64, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.ffn1 = nn.Linear(dim, 4 * dim)
        self.ffn2 = nn.Linear(4 * dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)
        self.scale = dim**-0.5

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x).unsqueeze(1)
        q, k, v = self.qkv(self.norm1(h)).chunk(3, dim=-1)
        attention = torch.softmax(q @ k.transpose(-2, -1) * self.scale, dim=-1)
        h = h + self.out(attention @ v)
        h = h + self.ffn2(F.gelu(self.ffn1(self.norm2(h))))
        return self.head(h.squeeze(1))


class LayerNormMLP(nn.Module):
    """Three blocks of Linear → LayerNorm → GELU (width ``dim``) and a linear head."""

    def __init__(self, dim: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.fc1, self.norm1 = nn.Linear(64, dim), nn.LayerNorm(dim)
        self.fc2, self.norm2 = nn.Linear(dim, dim), nn.LayerNorm(dim)
        self.fc3, self.norm3 = nn.Linear(dim, dim), nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.gelu(self.norm1(self.fc1(x)))
        x = F.gelu(self.norm2(self.fc2(x)))
        x = F.gelu(self.norm3(self.fc3(x)))
        return self.head(x)


class BatchNormCNN(nn.Module):
    """The 64 pixels as a 1-channel sequence: two Conv1d(k=3) → BatchNorm → ReLU, average pool, head."""

    def __init__(self, dim: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv1d(1, dim, 3, padding=1), nn.BatchNorm1d(dim)
        self.conv2, self.bn2 = nn.Conv1d(dim, dim, 3, padding=1), nn.BatchNorm1d(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x.unsqueeze(1))))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean(dim=-1))


ARCHS: dict[str, type[nn.Module]] = {
    "Transformer": OneTokenTransformer,
    "MLP+LN": LayerNormMLP,
    "CNN+BN": BatchNormCNN,
}
GRID_NAMES = {"Transformer": "grid-transformer", "MLP+LN": "grid-mlp-ln", "CNN+BN": "grid-cnn-bn"}


def file_order_split(test_fraction: float = 0.2, device: str | torch.device = "cpu") -> Split:
    """The digits in file order: the first ``int(test_fraction·1797)`` rows test, the rest train."""
    x, y = load_digits()
    n_test = int(test_fraction * len(x))
    x, y = x.to(device), y.to(device)
    return Split(x[n_test:], y[n_test:], x[:n_test], y[:n_test])


# --------------------------------------------------------------------------- the workload


@dataclass(frozen=True)
class Batch:
    """One training batch: the model's input and the class index per row (sample or token)."""

    inputs: Tensor
    targets: Tensor


@dataclass(frozen=True)
class Workload:
    """A model factory, its training batches, its loss and its evaluation.

    Attributes:
        name: the workload's name on the command line.
        description: one line for tables and the docs.
        make_model: builds the network (called under a fixed seed).
        batches: ``batches(seed)`` yields training batches forever, the same ones for a seed.
        evaluate: ``evaluate(model)`` → ``{"val_loss": ..., "accuracy": ...}`` on held-out data.
        metric: the score compared across methods: ``"accuracy"`` or ``"val_loss"``.
        steps: training steps of one run.
        lrs: the default learning-rate sweep.
        forward: ``forward(model, inputs)`` → logits (a Hugging Face model returns ``.logits``).
    """

    name: str
    description: str
    make_model: Callable[[], nn.Module]
    batches: Callable[[int], Iterator[Batch]]
    evaluate: Callable[[nn.Module], dict[str, float]]
    metric: str
    steps: int
    lrs: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
    forward: Callable[[nn.Module, Tensor], Tensor] = field(default=lambda model, x: model(x))

    @property
    def higher_is_better(self) -> bool:
        return self.metric == "accuracy"

    def with_steps(self, steps: int) -> Workload:
        """The same workload trained for ``steps`` steps."""
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        return replace(self, steps=steps)

    def loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Mean cross-entropy over every row (sample or token)."""
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


@torch.no_grad()
def _evaluate(model: nn.Module, forward: Callable[[nn.Module, Tensor], Tensor], x: Tensor, y: Tensor) -> dict:
    was = model.training
    model.eval()
    try:
        logits = forward(model, x)
        logits = logits.reshape(-1, logits.shape[-1]).float()
        targets = y.reshape(-1)
        loss = float(F.cross_entropy(logits, targets))
        acc = float((logits.argmax(dim=-1) == targets).float().mean())
    finally:
        model.train(was)
    return {"val_loss": loss if math.isfinite(loss) else math.inf, "accuracy": acc}


def _classifier(
    name: str,
    description: str,
    make: Callable[[], nn.Module],
    data: Split,
    *,
    batch_size: int | None,
    steps: int,
) -> Workload:
    def batches(seed: int) -> Iterator[Batch]:
        if batch_size is None:
            while True:
                yield Batch(data.x_train, data.y_train)
        for idx in minibatches(len(data.x_train), batch_size, seed + 11):
            yield Batch(data.x_train[idx], data.y_train[idx])

    def forward(model: nn.Module, x: Tensor) -> Tensor:
        return model(x)

    return Workload(
        name=name,
        description=description,
        make_model=make,
        batches=batches,
        evaluate=lambda model: _evaluate(model, forward, data.x_test, data.y_test),
        metric="accuracy",
        steps=steps,
        forward=forward,
    )


def digits_mlp_workload() -> Workload:
    """The demo's digits MLP, batch 64, 200 steps."""
    return _classifier(
        "digits-mlp",
        "MLP 64-128-10 on the digits, batch 64",
        digits_mlp,
        digits_split(0),
        batch_size=64,
        steps=200,
    )


def grid_workload(arch: str) -> Workload:
    """One model of the architecture grid on the digits in file order, batches of 128, 150 steps.

    The paper trains full-batch (1438 rows); batches of 128 keep the CNN's sweep affordable on a CPU.
    """
    return _classifier(
        GRID_NAMES[arch],
        f"{arch} of the architecture grid on the digits in file order, batch 128",
        ARCHS[arch],
        file_order_split(),
        batch_size=128,
        steps=150,
    )


# --------------------------------------------------------------------------- text


CONTEXT = 32
TEXT_BATCH = 16
VAL_WINDOWS = 64


def text_bytes() -> Tensor:
    """The English documentation text that ships with Python, as a tensor of bytes (int64)."""
    from pydoc_data.topics import topics

    text = "\n".join(topics[key] for key in sorted(topics)).encode("utf-8")
    return torch.frombuffer(bytearray(text), dtype=torch.uint8).to(torch.long)


def _windows(data: Tensor, starts: Tensor) -> Batch:
    rows = torch.stack([data[s : s + CONTEXT + 1] for s in starts.tolist()])
    return Batch(rows[:, :-1], rows[:, 1:])


def _text_workload(
    name: str,
    description: str,
    make: Callable[[], nn.Module],
    forward: Callable[[nn.Module, Tensor], Tensor],
    steps: int,
) -> Workload:
    data = text_bytes()
    cut = int(0.9 * len(data))
    train, held_out = data[:cut], data[cut:]
    val_starts = torch.linspace(0, len(held_out) - CONTEXT - 2, VAL_WINDOWS).long()
    val = _windows(held_out, val_starts)

    def batches(seed: int) -> Iterator[Batch]:
        gen = torch.Generator().manual_seed(seed + 11)
        while True:
            yield _windows(train, torch.randint(0, len(train) - CONTEXT - 1, (TEXT_BATCH,), generator=gen))

    return Workload(
        name=name,
        description=description,
        make_model=make,
        batches=batches,
        evaluate=lambda model: _evaluate(model, forward, val.inputs, val.targets),
        metric="val_loss",
        steps=steps,
        forward=forward,
    )


def byte_lm_workload() -> Workload:
    """A 2-block causal transformer over bytes of Python's documentation text, 150 steps."""
    return _text_workload(
        "byte-lm",
        f"causal transformer LM (2 blocks, width 64), bytes of pydoc_data.topics, {TEXT_BATCH}x{CONTEXT}",
        lambda: TinyLM(vocab=256, context=CONTEXT, width=64, heads=4, layers=2, dropout=0.0),
        lambda model, x: model(x),
        steps=150,
    )


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=CONTEXT,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(config)


def _llama_logits(model: nn.Module, x: Tensor) -> Tensor:
    return model(input_ids=x).logits


def llama_workload() -> Workload:
    """A Hugging Face Llama from a tiny config (byte vocabulary) on the same text, 150 steps."""
    return _text_workload(
        "llama",
        f"Hugging Face LlamaForCausalLM (2 layers, hidden 64), bytes of pydoc_data.topics, "
        f"{TEXT_BATCH}x{CONTEXT}",
        _llama,
        _llama_logits,
        steps=150,
    )


WORKLOADS: dict[str, Callable[[], Workload]] = {
    "digits-mlp": digits_mlp_workload,
    "grid-transformer": lambda: grid_workload("Transformer"),
    "grid-mlp-ln": lambda: grid_workload("MLP+LN"),
    "grid-cnn-bn": lambda: grid_workload("CNN+BN"),
    "byte-lm": byte_lm_workload,
    "llama": llama_workload,
}


def build_workload(name: str) -> Workload:
    """The workload called ``name``.

    Raises:
        ValueError: an unknown name; the message lists the known ones.
    """
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}")
    return WORKLOADS[name]()


#: The score each workload is compared by (higher is better for accuracy, lower for loss).
METRICS: dict[str, str] = {
    **dict.fromkeys(("digits-mlp", *GRID_NAMES.values()), "accuracy"),
    "byte-lm": "val_loss",
    "llama": "val_loss",
}


def needs(workload: str) -> str | None:
    """The package a workload needs beyond StepGuard's core, if any."""
    return "transformers" if workload == "llama" else None


def describe(workload: Workload) -> dict[str, Any]:
    """JSON-ready facts about a workload."""
    return {
        "name": workload.name,
        "description": workload.description,
        "metric": workload.metric,
        "steps": workload.steps,
    }
