"""A forward-mode rule for ``F.linear`` that builds its tangent in one output-sized tensor.

For y = x·Wᵀ + b the tangent is

    dy = dx·Wᵀ + x·dWᵀ + db

PyTorch's own rule (that of the matmul under ``linear``) forms the two products as separate
tensors and adds them, so next to the primal output it holds three output-sized tensors at
once. On a language-model head the output is the logits ([tokens, vocab]), and those three
are the largest tensors of the replay. :func:`linear` writes the second product into the
first in place (``addmm_``) and adds db there too: the replay holds the logits and one
tangent, nothing more.

The rule works on dual tensors (``torch.autograd.forward_ad``), the replay's single-tangent
path; under a ``torch.func`` transform :func:`applies` is False and PyTorch's rule runs.
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor

LARGE_OUTPUT_ELEMENTS = 1 << 20
"""Outputs of at least this many elements go to :func:`linear` during the replay.

Below it the memory saved is small and PyTorch's own rule, with no Python in the way, is
the cheaper one.
"""


def applies(x: Tensor, weight: Tensor) -> bool:
    """Whether :func:`linear` should compute ``F.linear(x, weight, …)`` here.

    True for an output of at least :data:`LARGE_OUTPUT_ELEMENTS` elements inside a dual
    level and outside every ``torch.func`` transform (whose tangents are not dual tensors).
    """
    if x.is_nested or weight.dim() != 2 or fwAD._current_level < 0 or _under_functorch():
        return False
    return (x.numel() // max(x.shape[-1], 1)) * weight.shape[0] >= LARGE_OUTPUT_ELEMENTS


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear`` on dual tensors, with a tangent held in one output-sized tensor."""
    x, d_x = fwAD.unpack_dual(x)
    weight, d_weight = fwAD.unpack_dual(weight)
    d_bias = None
    if bias is not None:
        bias, d_bias = fwAD.unpack_dual(bias)
    out = F.linear(x, weight, bias)
    if d_x is not None:
        tangent = F.linear(d_x, weight)
        if d_weight is not None:
            _add_product(tangent, x, d_weight)
    elif d_weight is not None:
        tangent = F.linear(x, d_weight)
    elif d_bias is not None:
        tangent = torch.zeros_like(out)
    else:
        return out
    if d_bias is not None:
        tangent.add_(d_bias.to(tangent.dtype))
    return fwAD.make_dual(out, tangent.to(out.dtype))


def _add_product(out: Tensor, x: Tensor, d_weight: Tensor) -> None:
    """out += x·dWᵀ, in place over out's rows (the rows of x flattened, as ``linear`` does)."""
    if not out.is_contiguous():
        out.add_(F.linear(x, d_weight))
        return
    out.view(-1, out.shape[-1]).addmm_(x.reshape(-1, x.shape[-1]).to(out.dtype), d_weight.to(out.dtype).t())


def _under_functorch() -> bool:
    """Whether a ``torch.func`` transform is active."""
    peek = getattr(torch._C._functorch, "peek_interpreter_stack", None)
    return peek is not None and peek() is not None
