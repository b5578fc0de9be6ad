"""The replay's rule for a large ``F.linear`` (a language model's head): the same tangent as
PyTorch's rule, in one output-sized tensor instead of three, on dual tensors only."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

import stepguard
from stepguard.geometry import jvp as jvp_module
from stepguard.geometry import linear as linear_rule
from stepguard.geometry.forward_rules import ForwardRules

ROWS, FEATURES, OUT = 2 * 300, 16, 2048  # 1.2M output elements: above the rule's threshold


def dual(primal: Tensor, tangent: Tensor | None) -> Tensor:
    return primal if tangent is None else fwAD.make_dual(primal, tangent)


def routed_linear(x: Tensor, w: Tensor, b: Tensor, dx, dw, db) -> tuple[Tensor, Tensor, int]:
    with fwAD.dual_level(), ForwardRules() as mode:
        out = F.linear(dual(x, dx), dual(w, dw), bias=dual(b, db))
        primal, tangent = fwAD.unpack_dual(out)
    return primal, tangent, mode.fired


@pytest.mark.parametrize("which", ["x,w,b", "x,w", "w", "x", "b"])
def test_the_tangent_is_pytorchs_for_every_mix_of_tangents(which: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, ROWS // 2, FEATURES, dtype=torch.float64)
    w, b = torch.randn(OUT, FEATURES, dtype=torch.float64), torch.randn(OUT, dtype=torch.float64)
    given = {n: torch.randn_like(t) if n in which.split(",") else None for n, t in zip("xwb", (x, w, b), strict=True)}
    primal, tangent, fired = routed_linear(x, w, b, given["x"], given["w"], given["b"])
    zeros = [torch.zeros_like(t) if given[n] is None else given[n] for n, t in zip("xwb", (x, w, b), strict=True)]
    want_primal, want_tangent = torch.func.jvp(F.linear, (x, w, b), tuple(zeros))
    assert fired == 1
    assert torch.equal(primal, want_primal)
    assert float((tangent - want_tangent).abs().max()) <= 1e-12 * float(want_tangent.abs().max())


class FreshOfSize(TorchDispatchMode):
    """How many tensors of a given number of elements out-of-place ops created."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.count = numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        in_place = func._schema.name.endswith("_") or any(a.is_write for a in func._schema.arguments if a.alias_info)
        if not in_place and not func.is_view:
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, Tensor) and t.numel() == self.numel:
                    self.count += 1
        return out


def test_it_makes_one_output_sized_tangent_where_pytorch_makes_three() -> None:
    x, w = torch.randn(ROWS, FEATURES), torch.randn(OUT, FEATURES)
    dx, dw = torch.randn_like(x), torch.randn_like(w)
    with FreshOfSize(ROWS * OUT) as ours:
        routed_linear(x, w, torch.zeros(OUT), dx, dw, None)
    with FreshOfSize(ROWS * OUT) as theirs, fwAD.dual_level():
        F.linear(dual(x, dx), dual(w, dw))
    assert ours.count == 2  # the output and its tangent
    assert theirs.count >= 4  # the output, dx·Wᵀ, x·dWᵀ and their sum


def test_small_outputs_and_torch_func_transforms_keep_pytorchs_rule() -> None:
    x, w, b = torch.randn(4, FEATURES), torch.randn(8, FEATURES), torch.randn(8)
    _, _, fired = routed_linear(x, w, b, torch.randn_like(x), None, None)
    assert fired == 0
    x, w = torch.randn(ROWS, FEATURES), torch.randn(OUT, FEATURES)
    dws = torch.randn(2, OUT, FEATURES)
    with ForwardRules() as mode:
        tangents = torch.vmap(lambda d: torch.func.jvp(lambda v: F.linear(x, v), (w,), (d,))[1])(dws)
    assert mode.fired == 0
    assert torch.allclose(tangents[1], F.linear(x, dws[1]), atol=1e-5)


def test_half_precision_under_autocast_keeps_the_training_dtype() -> None:
    torch.manual_seed(1)
    x, w = torch.randn(ROWS, FEATURES), torch.randn(OUT, FEATURES)
    dx, dw = torch.randn_like(x), torch.randn_like(w)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        primal, tangent, fired = routed_linear(x, w, torch.zeros(OUT), dx, dw, None)
    exact = dx.double() @ w.double().T + x.double() @ dw.double().T
    assert fired == 1 and primal.dtype == tangent.dtype == torch.bfloat16
    assert float((tangent.double() - exact).abs().max()) <= 2 * 2**-8 * float(exact.abs().max())


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 4096, hidden: int = 16) -> None:
        super().__init__()
        self.embed, self.mix, self.head = nn.Embedding(vocab, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(torch.tanh(self.mix(self.embed(tokens))))


def test_the_guards_radius_is_the_same_with_and_without_the_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(2)
    model = TinyLM().double()
    tokens = torch.randint(0, 4096, (4, 64))  # 256 rows x 4096 = 1M logits
    direction = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    with_rule = stepguard.radius(model, tokens, direction)
    assert jvp_module._rules_needed[model] is True  # the head's linear is the only rule that can fire
    monkeypatch.setattr(linear_rule, "LARGE_OUTPUT_ELEMENTS", 1 << 40)
    without = stepguard.radius(model, tokens, direction)
    assert with_rule.estimator == without.estimator == "jvp"
    assert with_rule.delta_a == pytest.approx(without.delta_a, rel=1e-12)
