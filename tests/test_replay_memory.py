"""A replay that runs out of memory: a clear error with the memory it asked for and the fix,
the step rolled back; and GuardConfig(attention_chunk=...) reaching the attention rule."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import stepguard
from stepguard import GuardConfig, ReplayOutOfMemoryError, StepGuard
from stepguard.geometry import forward_rules
from stepguard.geometry.jvp import is_replaying

CPU_REFUSAL = (
    "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
    "you tried to allocate 2147483648 bytes. Error code 12 (Cannot allocate memory)"
)


class Starved(nn.Module):
    """A classifier whose replay (never its training forward) fails to allocate."""

    def __init__(self, error: BaseException) -> None:
        super().__init__()
        self.net, self.error = nn.Linear(6, 5), error

    def forward(self, x: Tensor) -> Tensor:
        if is_replaying():
            raise self.error
        return self.net(x)


def oom_errors() -> list[BaseException]:
    errors: list[BaseException] = [RuntimeError(CPU_REFUSAL)]
    kind = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if kind is not None:
        errors.append(kind("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79 GiB"))
    return errors


@pytest.mark.parametrize("error", oom_errors(), ids=lambda e: type(e).__name__)
def test_a_replay_out_of_memory_names_what_it_needed_and_the_fix(error: BaseException) -> None:
    torch.manual_seed(0)
    model = Starved(error)
    guard = StepGuard(torch.optim.SGD(model.parameters(), lr=0.1), model=model, policy="clip")
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(8, 6), torch.randint(0, 5, (8,))
    guard.zero_grad()
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(ReplayOutOfMemoryError) as caught:
        guard.step(targets=y)
    message = str(caught.value)
    assert "2,048 MiB" in message and "8 rows" in message
    assert "attention_chunk=256" in message and "GuardConfig(attention_chunk=" in message
    assert caught.value.requested == 2**31 and caught.value.rows == 8
    assert isinstance(caught.value, MemoryError) and caught.value.__cause__ is error
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))  # rolled back


def test_other_runtime_errors_pass_through_unchanged() -> None:
    model = Starved(RuntimeError("shape mismatch in the replay"))
    guard = StepGuard(torch.optim.SGD(model.parameters(), lr=0.1), model=model)
    x, y = torch.randn(4, 6), torch.randint(0, 5, (4,))
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="shape mismatch") as caught:
        guard.step(targets=y)
    assert not isinstance(caught.value, ReplayOutOfMemoryError)


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.out = nn.Linear(8, 24), nn.Linear(8, 5)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 4)).permute(2, 0, 3, 1, 4)
        return self.out(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(2))


def test_the_attention_chunk_of_the_config_reaches_the_attention_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    chunks: list[int] = []
    original = forward_rules.attention

    def recording(*args, chunk_size: int, **kwargs):
        chunks.append(chunk_size)
        return original(*args, chunk_size=chunk_size, **kwargs)

    monkeypatch.setattr(forward_rules, "attention", recording)
    torch.manual_seed(1)
    model = Attention()
    guard = StepGuard(torch.optim.SGD(model.parameters(), lr=0.1), model=model,
                      config=GuardConfig(attention_chunk=3))
    x, y = torch.randn(2, 7, 8), torch.randint(0, 5, (2, 7))
    F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
    report = guard.step(targets=y)
    assert report.estimator == "jvp" and chunks == [3]
    with pytest.raises(ValueError, match="attention_chunk"):
        GuardConfig(attention_chunk=0)
    assert stepguard.ReplayOutOfMemoryError is ReplayOutOfMemoryError
