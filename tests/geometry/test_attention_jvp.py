"""The forward-mode rule for ``scaled_dot_product_attention`` against PyTorch's math backend:
every mask form, grouped-query attention, dropout, dual tensors, vmap, and its memory bound."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

from stepguard.geometry.attention import attention, attention_tangent

B, H, T, E = 2, 4, 19, 8


def relative_error(a: Tensor, ref: Tensor) -> float:
    return float((a - ref).abs().max() / ref.abs().max())


def math_jvp(primals: tuple[Tensor, ...], tangents: tuple[Tensor, ...], **options) -> tuple[Tensor, Tensor]:
    """The reference: PyTorch's composite math attention, differentiated by forward-mode AD."""

    def sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return F.scaled_dot_product_attention(q, k, v, **options)

    with sdpa_kernel(SDPBackend.MATH):
        return torch.func.jvp(sdpa, primals, tangents)


def rule_jvp(primals, tangents, chunk_size: int, **options) -> tuple[Tensor, Tensor]:
    return torch.func.jvp(lambda q, k, v: attention(q, k, v, chunk_size=chunk_size, **options), primals, tangents)


def qkv(kv_heads: int = H, queries: int = T) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    primals = (torch.randn(B, H, queries, E), torch.randn(B, kv_heads, T, E), torch.randn(B, kv_heads, T, E))
    return primals, tuple(torch.randn_like(p) for p in primals)


def padding_mask() -> Tensor:
    keep = torch.ones(B, 1, 1, T, dtype=torch.bool)
    keep[0, ..., 13:] = False
    return keep


def mask_with_an_empty_row() -> Tensor:
    keep = torch.rand(T, T) > 0.4
    keep[5] = False  # a query that sees no key: its output is constant (zero tangent)
    return keep


CASES: dict[str, Callable[[], dict]] = {
    "no mask": dict,
    "causal": lambda: {"is_causal": True},
    "float mask": lambda: {"attn_mask": torch.randn(B, 1, T, T)},
    "float mask broadcast over keys": lambda: {"attn_mask": torch.randn(1, H, T, 1)},
    "boolean padding mask": lambda: {"attn_mask": padding_mask()},
    "boolean mask, a row without keys": lambda: {"attn_mask": mask_with_an_empty_row()},
    "custom scale": lambda: {"scale": 0.3, "is_causal": True},
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("chunk_size", [3, 256])
def test_tangent_matches_the_math_backend(case: str, chunk_size: int) -> None:
    primals, tangents = qkv()
    options = CASES[case]()
    out_ref, tangent_ref = math_jvp(primals, tangents, **options)
    out, tangent = rule_jvp(primals, tangents, chunk_size, **options)
    assert torch.equal(out, F.scaled_dot_product_attention(*primals, **options))
    assert relative_error(out, out_ref) < 1e-5
    assert relative_error(tangent, tangent_ref) < 1e-5


@pytest.mark.parametrize("causal", [False, True])
def test_grouped_query_attention(causal: bool) -> None:
    primals, tangents = qkv(kv_heads=2)
    options = {"enable_gqa": True, "is_causal": causal}
    _, tangent_ref = math_jvp(primals, tangents, **options)
    _, tangent = rule_jvp(primals, tangents, 4, **options)
    assert relative_error(tangent, tangent_ref) < 1e-5


def test_causal_with_fewer_queries_than_keys_is_aligned_top_left_as_pytorch() -> None:
    primals, tangents = qkv(queries=7)
    _, tangent_ref = math_jvp(primals, tangents, is_causal=True)
    _, tangent = rule_jvp(primals, tangents, 2, is_causal=True)
    assert relative_error(tangent, tangent_ref) < 1e-5


def test_a_mask_with_a_tangent_contributes_to_the_scores_tangent() -> None:
    (q, k, v), (dq, dk, dv) = qkv()
    bias, d_bias = torch.randn(1, H, T, T), torch.randn(1, H, T, T)

    def sdpa(fn: Callable, q: Tensor, k: Tensor, v: Tensor, m: Tensor) -> Tensor:
        return fn(q, k, v, attn_mask=m)

    with sdpa_kernel(SDPBackend.MATH):
        _, tangent_ref = torch.func.jvp(
            lambda *a: sdpa(F.scaled_dot_product_attention, *a), (q, k, v, bias), (dq, dk, dv, d_bias)
        )
    rule = lambda *a, **kw: attention(*a, chunk_size=5, **kw)  # noqa: E731
    _, tangent = torch.func.jvp(lambda *a: sdpa(rule, *a), (q, k, v, bias), (dq, dk, dv, d_bias))
    assert relative_error(tangent, tangent_ref) < 1e-5


def test_dual_tensors_and_missing_tangents() -> None:
    (q, k, v), (dq, _, dv) = qkv()
    _, tangent_ref = math_jvp((q, k, v), (dq, torch.zeros_like(k), dv), is_causal=True)
    with fwAD.dual_level():
        out = attention(fwAD.make_dual(q, dq), k, fwAD.make_dual(v, dv), is_causal=True, chunk_size=4)
        tangent = fwAD.unpack_dual(out).tangent
    assert relative_error(tangent, tangent_ref) < 1e-5


def test_several_tangents_at_once_under_vmap() -> None:
    primals, _ = qkv()
    stacked = tuple(torch.randn(3, *p.shape) for p in primals)

    def one(fn: Callable, tangents: tuple[Tensor, ...]) -> Tensor:
        return torch.func.jvp(lambda q, k, v: fn(q, k, v, is_causal=True), primals, tangents)[1]

    rule = lambda *a, **kw: attention(*a, chunk_size=6, **kw)  # noqa: E731
    batched = torch.func.vmap(lambda *t: one(rule, t))(*stacked)
    for i in range(3):
        _, tangent_ref = math_jvp(primals, tuple(s[i] for s in stacked), is_causal=True)
        assert relative_error(batched[i], tangent_ref) < 1e-5


def test_dropout_is_the_math_backends_with_the_same_generator() -> None:
    primals, tangents = qkv()
    torch.manual_seed(7)
    out_ref, tangent_ref = math_jvp(primals, tangents, dropout_p=0.3)
    torch.manual_seed(7)
    out, tangent = rule_jvp(primals, tangents, 4, dropout_p=0.3)
    assert torch.equal(out, out_ref)
    assert relative_error(tangent, tangent_ref) < 1e-5


def test_half_precision_inputs_give_a_tangent_of_their_dtype_accumulated_in_float32() -> None:
    primals, tangents = qkv()
    _, tangent_ref = math_jvp(primals, tangents, is_causal=True)
    half = tuple(t.bfloat16() for t in primals), tuple(t.bfloat16() for t in tangents)
    tangent = attention_tangent((*half[0], None), (*half[1], None), is_causal=True, chunk_size=4)
    assert tangent.dtype == torch.bfloat16
    assert relative_error(tangent.float(), tangent_ref) < 3e-2  # bf16 inputs: 8 bits of mantissa


class LargestTensor(TorchDispatchMode):
    """The most elements of any tensor an op returned while active."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def largest_intermediate(length: int, chunk_size: int) -> int:
    q, k, v = (torch.randn(1, 2, length, E) for _ in range(3))
    dq, dk, dv = (torch.randn_like(t) for t in (q, k, v))
    with LargestTensor() as probe:
        attention_tangent((q, k, v, None), (dq, dk, dv, None), is_causal=True, chunk_size=chunk_size)
    return probe.largest


def test_the_tangent_never_builds_a_full_attention_matrix() -> None:
    length, chunk = 96, 8
    bounded = largest_intermediate(length, chunk)
    assert bounded <= 2 * length * max(chunk, E)  # (heads, T, chunk) and (heads, T, E)
    assert largest_intermediate(length, length) >= 2 * length * length  # the probe sees T×T when it exists


def test_chunk_size_must_be_positive() -> None:
    primals, _ = qkv()
    with pytest.raises(ValueError, match="chunk_size must be a positive integer, got 0"):
        attention(*primals, chunk_size=0)


def test_no_reverse_mode_derivative() -> None:
    q, k, v = (torch.randn(1, 1, 4, 2, requires_grad=True) for _ in range(3))
    out = attention(q, k, v)
    with pytest.raises(RuntimeError, match="forward-mode derivative only"):
        out.sum().backward()
    assert math.isfinite(float(out.detach().sum()))
