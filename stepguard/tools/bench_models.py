"""The workloads of ``stepguard bench``: built-in models with their data, and a user's model.

A :class:`Workload` is everything one benchmarked training step needs: a factory for the
network (called once per benchmarked variant, under a fixed seed, so every variant
starts from the same weights), a small pool of pre-built batches (data loading is not
timed) and the loss. Built-in workloads:

* ``mlp`` — the digits MLP of the demo (64-128-10, ReLU) on the embedded digits data,
  batch 64;
* ``cnn`` — a small CNN with BatchNorm (two 3×3 convolutions, 16 and 32 channels, each
  followed by BatchNorm and ReLU, max-pooling, a linear head) on the digits as 1×8×8
  images, batch 64;
* ``lm`` — a small causal transformer language model (2 pre-norm blocks, width 64,
  4 heads, dropout 0.1, vocabulary 64) on synthetic token sequences of length 32,
  batch 16, whose tail positions are padding: their targets are ``-100`` and they do
  not count, neither in the loss nor in the guard's spread;
* ``llama32k`` and ``llama128k`` — a Hugging Face ``LlamaForCausalLM`` built from a
  config (no download: hidden 256, 2 layers, 4 heads, MLP 512, untied head, eager
  attention) at a realistic vocabulary, 32,000 (batch 8 × 128 tokens) and 128,000
  (batch 4 × 128 tokens), on uniformly random tokens. They need the ``transformers``
  extra; without it they raise :class:`WorkloadUnavailable` naming the install command.

A user's model (``--model pkg.module:factory`` or ``file.py:factory``, resolved as the
analyzer resolves it) gets random inputs of ``--input-shape``
(or integer tokens below ``--vocab``) and random class targets, or the tensors of a
``--data`` file; see :func:`user_workload`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stepguard.datasets import load_digits

IGNORE_INDEX = -100


@dataclass(frozen=True)
class LlamaSpec:
    """The shape of a benchmarked Llama: its vocabulary and one batch of token sequences."""

    vocab: int
    batch_size: int
    length: int = 128
    hidden: int = 256
    layers: int = 2
    heads: int = 4
    intermediate: int = 512


#: The Hugging Face Llama workloads by name (tests swap in tiny shapes).
LLAMAS: dict[str, LlamaSpec] = {
    "llama32k": LlamaSpec(vocab=32_000, batch_size=8),
    "llama128k": LlamaSpec(vocab=128_000, batch_size=4),
}
BUILTIN = ("mlp", "cnn", "lm", *LLAMAS)
#: What ``stepguard bench`` runs when no model is named (the Llamas are opt-in: they are slow).
DEFAULT_MODELS = ("mlp", "cnn", "lm")


class WorkloadUnavailable(RuntimeError):
    """A built-in workload needs a package that is not installed; the message says how to get it."""


@dataclass
class BenchBatch:
    """One training batch: the forward's inputs and the targets of the loss.

    Attributes:
        inputs: the model's positional argument.
        targets: class index per sample, or per (sample, position) for sequence models;
            ``-100`` marks rows that do not count.
    """

    inputs: Tensor
    targets: Tensor

    def to(self, device: torch.device | str) -> BenchBatch:
        return BenchBatch(self.inputs.to(device), self.targets.to(device))


def _logits(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, dict) and "logits" in output:
        return output["logits"]
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}")


def classification_loss(output: Any, targets: Tensor) -> Tensor:
    """Mean cross-entropy over every row (sample or token) whose target is not ``-100``."""
    logits = _logits(output)
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX
    )


@dataclass
class Workload:
    """A benchmarked model, its batches and its loss.

    Attributes:
        name: short name shown in the table.
        description: one line: architecture and batch.
        factory: builds a fresh network (called under a fixed seed).
        batches: a pool of batches the steps cycle through.
        loss_fn: ``loss_fn(output, targets)`` → scalar loss.
        logits_bytes: bytes of one batch's logits in the training dtype (None: not a
            sequence model); the memory report counts extra bytes in these units too.
    """

    name: str
    description: str
    factory: Callable[[], nn.Module]
    batches: list[BenchBatch]
    loss_fn: Callable[[Any, Tensor], Tensor] = classification_loss
    logits_bytes: int | None = None

    def __post_init__(self) -> None:
        if not self.batches:
            raise ValueError(f"workload {self.name!r} has no batches")

    def to(self, device: torch.device | str) -> Workload:
        """The same workload with its batches on ``device``."""
        return Workload(
            self.name,
            self.description,
            self.factory,
            [b.to(device) for b in self.batches],
            self.loss_fn,
            self.logits_bytes,
        )


# ---------------------------------------------------------------- built-in models


def digits_cnn() -> nn.Module:
    """A small CNN with BatchNorm for 1×8×8 digits: conv16-BN-ReLU, conv32-BN-ReLU, pool, linear."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 10),
    )


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention written with matmul and softmax.

    Written out (rather than through ``F.scaled_dot_product_attention``) because the
    fused CPU attention kernel has no forward-mode AD rule: with it, the guard would fall
    back to a finite difference, and the benchmark would time that instead of the JVP.
    """

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        n, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=-1)
        q, k, v = (u.view(n, t, self.heads, c // self.heads).transpose(1, 2) for u in (q, k, v))
        scores = q @ k.transpose(-2, -1) / math.sqrt(c // self.heads)
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        weights = self.drop(scores.masked_fill(causal, float("-inf")).softmax(dim=-1))
        return self.out((weights @ v).transpose(1, 2).reshape(n, t, c))


class Block(nn.Module):
    """A pre-norm transformer block: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads, dropout)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width), nn.Dropout(dropout)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    """A small causal transformer language model: tokens (N, T) → logits (N, T, vocab).

    Args:
        vocab: vocabulary size.
        context: longest sequence (learned position embeddings).
        width, heads, layers, dropout: the transformer's shape.
    """

    def __init__(
        self,
        vocab: int = 64,
        context: int = 32,
        width: int = 64,
        heads: int = 4,
        layers: int = 2,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(context, width)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(width, heads, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.drop(self.tokens(tokens) + self.positions(positions))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def _digit_batches(batch_size: int, count: int, seed: int, images: bool) -> list[BenchBatch]:
    x, y = load_digits()
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=gen)
    batches = []
    for i in range(count):
        idx = order[(i * batch_size + torch.arange(batch_size)) % len(x)]
        inputs = x[idx].reshape(-1, 1, 8, 8) if images else x[idx]
        batches.append(BenchBatch(inputs.contiguous(), y[idx]))
    return batches


def _token_batches(
    batch_size: int, count: int, seed: int, vocab: int = 64, length: int = 32
) -> list[BenchBatch]:
    """Sequences of a fixed random Markov chain, with padded tails (pad token 0, target -100)."""
    gen = torch.Generator().manual_seed(seed)
    transition = torch.softmax(3.0 * torch.randn(vocab, vocab, generator=gen), dim=-1)
    batches = []
    for _ in range(count):
        seq = torch.empty(batch_size, length + 1, dtype=torch.long)
        seq[:, 0] = torch.randint(1, vocab, (batch_size,), generator=gen)
        for t in range(length):
            seq[:, t + 1] = torch.multinomial(transition[seq[:, t]], 1, generator=gen).squeeze(1)
        inputs, targets = seq[:, :-1].clone(), seq[:, 1:].clone()
        lengths = torch.randint(length // 2, length + 1, (batch_size,), generator=gen)
        pad = torch.arange(length).unsqueeze(0) >= lengths.unsqueeze(1)
        inputs[pad] = 0
        targets[pad] = IGNORE_INDEX
        batches.append(BenchBatch(inputs, targets))
    return batches


def _llama_factory(spec: LlamaSpec) -> Callable[[], nn.Module]:
    from transformers import LlamaConfig, LlamaForCausalLM

    def build() -> nn.Module:
        config = LlamaConfig(
            vocab_size=spec.vocab,
            hidden_size=spec.hidden,
            intermediate_size=spec.intermediate,
            num_hidden_layers=spec.layers,
            num_attention_heads=spec.heads,
            num_key_value_heads=spec.heads,
            max_position_embeddings=spec.length,
            tie_word_embeddings=False,
            use_cache=False,
            attn_implementation="eager",
        )
        return LlamaForCausalLM(config)

    return build


def llama_workload(
    name: str, spec: LlamaSpec, *, batch_size: int | None = None, pool: int = 2, seed: int = 0
) -> Workload:
    """A Hugging Face Llama of shape ``spec`` on uniformly random tokens (next token as target).

    Raises:
        WorkloadUnavailable: ``transformers`` is not installed (the message says how to install it).
    """
    from stepguard._extras import missing_extra

    missing = missing_extra("transformers", "transformers", f"the {name} workload")
    if missing:
        raise WorkloadUnavailable(missing)
    bs = batch_size or spec.batch_size
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(pool):
        seq = torch.randint(0, spec.vocab, (bs, spec.length + 1), generator=gen)
        batches.append(BenchBatch(seq[:, :-1].contiguous(), seq[:, 1:].contiguous()))
    description = (
        f"HF LlamaForCausalLM, vocab {spec.vocab:,}, hidden {spec.hidden}, {spec.layers} layers, "
        f"eager attention, {bs}x{spec.length} random tokens"
    )
    logits_bytes = bs * spec.length * spec.vocab * torch.get_default_dtype().itemsize
    return Workload(name, description, _llama_factory(spec), batches, logits_bytes=logits_bytes)


def builtin_workload(name: str, *, batch_size: int | None = None, pool: int = 8, seed: int = 0) -> Workload:
    """One of the built-in workloads: ``"mlp"``, ``"cnn"``, ``"lm"``, ``"llama32k"`` or ``"llama128k"``.

    Args:
        name: the workload.
        batch_size: overrides the default (64 for the digits models, 16 sequences for the LM,
            8 and 4 for the Llamas).
        pool: how many distinct batches the steps cycle through (at most 2 for the Llamas).
        seed: seed of the batch order (and of the synthetic tokens).

    Raises:
        WorkloadUnavailable: a Llama without ``transformers`` installed.
    """
    if name in ("mlp", "cnn"):
        from stepguard.demo import digits_mlp

        bs = batch_size or 64
        images = name == "cnn"
        description = (
            f"CNN conv16-BN-conv32-BN-pool-linear, digits 1x8x8, batch {bs}"
            if images
            else f"MLP 64-128-10 ReLU, digits, batch {bs}"
        )
        factory = digits_cnn if images else digits_mlp
        return Workload(name, description, factory, _digit_batches(bs, pool, seed, images=images))
    if name == "lm":
        bs = batch_size or 16
        description = f"causal transformer LM, 2 blocks, width 64, vocab 64, {bs}x32 tokens, padded tails"
        batches = _token_batches(bs, pool, seed)
        return Workload("lm", description, TinyLM, batches, logits_bytes=bs * 32 * 64 * 4)
    if name in LLAMAS:
        return llama_workload(name, LLAMAS[name], batch_size=batch_size, pool=min(pool, 2), seed=seed)
    raise ValueError(f"unknown built-in model {name!r}; choose from {', '.join(BUILTIN)}")


# ---------------------------------------------------------------- a user's model


def _load_data(path: Path) -> tuple[Tensor, Tensor | None]:
    if not path.exists():
        raise FileNotFoundError(f"data file {path} does not exist")
    data = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(data, dict):
        if "inputs" not in data:
            raise ValueError(f"{path}: a data dict needs an 'inputs' tensor (and optionally 'targets')")
        return data["inputs"], data.get("targets")
    if isinstance(data, (tuple, list)) and data and isinstance(data[0], Tensor):
        return data[0], data[1] if len(data) > 1 else None
    if isinstance(data, Tensor):
        return data, None
    raise ValueError(f"{path}: expected a tensor, a (inputs, targets) tuple or a dict with 'inputs'")


def _random_inputs(shape: tuple[int, ...], vocab: int | None, gen: torch.Generator) -> Tensor:
    if vocab:
        return torch.randint(0, vocab, shape, generator=gen)
    return torch.randn(shape, generator=gen)


def user_workload(
    spec: str,
    *,
    input_shape: Sequence[int] | None = None,
    classes: int | None = None,
    vocab: int | None = None,
    data: str | Path | None = None,
    batch_size: int = 64,
    pool: int = 8,
    seed: int = 0,
) -> Workload:
    """A workload for the user's model ``spec`` (``"pkg.module:factory"``).

    Inputs come from ``data`` (a ``torch.save`` file holding a tensor, an ``(inputs,
    targets)`` tuple or a dict with ``"inputs"`` and optionally ``"targets"``; its rows
    are sliced into batches) or are random: standard normal of shape
    ``(batch_size, *input_shape)``, or integer tokens below ``vocab`` of that shape.
    Targets, when not given, are random classes below ``classes`` (default: the size of
    the output's last dimension), one per output row: (N,) for (N, K) logits, (N, T) for
    (N, T, K) logits.

    Raises:
        ValueError: neither ``input_shape`` nor ``data`` is given, or the shapes disagree.
    """
    from stepguard.analysis.model import load_factory  # the analyzer's resolver: modules and .py files

    factory = load_factory(spec)
    gen = torch.Generator().manual_seed(seed)
    if data is not None:
        inputs_all, targets_all = _load_data(Path(data))
        n = inputs_all.shape[0]
        if targets_all is not None and targets_all.shape[0] != n:
            raise ValueError(f"{data}: {n} inputs but {targets_all.shape[0]} targets")
        batch_size = min(batch_size, n)
        chunks = [
            (inputs_all[i : i + batch_size], None if targets_all is None else targets_all[i : i + batch_size])
            for i in range(0, n - batch_size + 1, batch_size)
        ][:pool]
        source = f"data {Path(data).name}"
    elif input_shape:
        shape = (batch_size, *input_shape)
        chunks = [(_random_inputs(shape, vocab, gen), None) for _ in range(pool)]
        kind = f"tokens<{vocab}" if vocab else "normal"
        source = f"random {kind} inputs {tuple(input_shape)}"
    else:
        raise ValueError("a --model needs --input-shape (random inputs) or --data FILE")

    probe_targets = None
    if any(t is None for _, t in chunks):
        torch.manual_seed(seed)
        model = factory()
        if not isinstance(model, nn.Module):
            raise ValueError(f"--model {spec} returned {type(model).__name__}, not a torch.nn.Module")
        with torch.no_grad():
            logits = _logits(model(chunks[0][0]))
        if logits.ndim < 2:
            raise ValueError(
                f"--model {spec}: output of shape {tuple(logits.shape)}; the bench needs logits "
                "(N, K) or (N, T, K)"
            )
        k = classes or logits.shape[-1]
        if k > logits.shape[-1]:
            raise ValueError(f"--classes {k} exceeds the output's {logits.shape[-1]} logits")
        probe_targets = (logits.shape[1:-1], k)
    batches = []
    for x, t in chunks:
        if t is None:
            assert probe_targets is not None
            rest, k = probe_targets
            t = torch.randint(0, k, (x.shape[0], *rest), generator=gen)
        batches.append(BenchBatch(x, t))
    return Workload(spec, f"{spec}, {source}, batch {batch_size}", factory, batches)
