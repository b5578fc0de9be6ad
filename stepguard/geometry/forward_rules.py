"""Forward-mode rules for the ops PyTorch has none for, active only while the guard measures.

:func:`forward_rules` is the context the forward-mode replay runs in. Inside it:

* ``F.scaled_dot_product_attention`` goes to :func:`stepguard.geometry.attention.attention`
  (the fused kernel's output, a chunked tangent), whatever backend the dispatcher would pick;
* ``torch._grouped_mm`` (mixture-of-experts layers: Hugging Face's default experts
  implementation) and transformers' ``grouped_mm_fallback`` op get the rule of a bilinear
  map, d(A·B) = dA·B + A·dB, computed with the same op;
* ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` take their composite path: an
  active torch-function mode makes their fused fast paths (``_native_multi_head_attention``,
  ``_transformer_encoder_layer_fwd``) step aside, and the composite path calls
  ``scaled_dot_product_attention``;
* ``F.linear`` with a large output (a language model's head: the logits) goes to
  :func:`stepguard.geometry.linear.linear`, whose tangent takes one output-sized tensor
  where PyTorch's rule takes three (on dual tensors; under ``torch.func`` PyTorch's rule);
* functions and modules compiled with ``torch.compile`` run eagerly (``force_eager``), so the
  rules above see their ops.

Outside the context nothing changes: the training forward runs the kernels it always ran.
The module also turns a missing forward-mode rule into a message that names the op and the
module that called it (:func:`describe_gap`).
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import FunctionType, TracebackType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from stepguard.geometry import linear
from stepguard.geometry.attention import DEFAULT_CHUNK_SIZE, attention

_GROUPED_MM_OPS = frozenset({"aten::_grouped_mm", "transformers::grouped_mm_fallback"})


class ForwardRules(TorchFunctionMode):
    """Routes the ops without a forward-mode derivative to rules that have one (and large
    linear outputs to a rule that needs less memory).

    Args:
        chunk_size: keys per block in the attention tangent (memory O(T·chunk) per head).

    Attributes:
        fired: how many calls went to a rule.
    """

    def __init__(self, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        super().__init__()
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        self.chunk_size = chunk_size
        self.fired = 0
        self._mha: Callable[..., Any] | None = None

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.fired += 1
            return self._attention(*args, **kwargs)
        if func is torch._grouped_mm or _op_name(func) in _GROUPED_MM_OPS:
            self.fired += 1
            return _bilinear(func, args, kwargs)
        if func is F.multi_head_attention_forward:
            self.fired += 1
            return self._multi_head_attention(*args, **kwargs)
        if func is F.linear:
            x, weight, bias = _linear_arguments(*args, **kwargs)
            if linear.applies(x, weight):
                self.fired += 1
                return linear.linear(x, weight, bias)
        return func(*args, **kwargs)

    def _multi_head_attention(self, *args: Any, **kwargs: Any) -> Any:
        """``F.multi_head_attention_forward`` whose attention call goes to :meth:`_attention`.

        A torch-function mode sees the calls of a Python function that dispatches to it only
        from outside: inside, the mode is off. So the same code runs with its module-level
        ``scaled_dot_product_attention`` bound to the rule.
        """
        if self._mha is None:
            self._mha = _rebind(F.multi_head_attention_forward, scaled_dot_product_attention=self._attention)
        return self._mha(*args, **kwargs)

    def _attention(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attn_mask: Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
    ) -> Tensor:
        if any(t.is_nested for t in (query, key, value)):
            return F.scaled_dot_product_attention(
                query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa
            )
        return attention(
            query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, chunk_size=self.chunk_size
        )


def _linear_arguments(
    input: Tensor, weight: Tensor, bias: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor | None]:
    return input, weight, bias


def _rebind(func: Callable[..., Any], **names: Any) -> Callable[..., Any]:
    """A copy of a Python function that finds ``names`` among its globals, with these values."""
    code = func.__code__  # type: ignore[attr-defined]
    copy = FunctionType(
        code,
        {**func.__globals__, **names},  # type: ignore[attr-defined]
        func.__name__,
        func.__defaults__,  # type: ignore[attr-defined]
        func.__closure__,  # type: ignore[attr-defined]
    )
    copy.__kwdefaults__ = func.__kwdefaults__  # type: ignore[attr-defined]
    return copy


def _op_name(func: Any) -> str | None:
    """``namespace::name`` of a ``torch.ops`` callable (overload or packet), else None."""
    schema = getattr(func, "_schema", None)
    if schema is not None:
        return schema.name
    qualified = getattr(func, "_qualified_op_name", None)
    return qualified if isinstance(qualified, str) else None


def _bilinear(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    """A grouped matmul with its keywords (offs, bias, out_dtype) bound to their positions.

    The op's own argument parser has checked the names before the mode saw the call.
    """
    a, b, *rest = args
    names = ("offs", "bias", "out_dtype")
    given = {**dict(zip(names, rest, strict=False)), **kwargs}
    ordered = [given.get(n) for n in names]
    while ordered and ordered[-1] is None:
        ordered.pop()
    return _Bilinear.apply(func, a, b, *ordered)


def _is_shift(value: Any) -> bool:
    """A floating-point tensor among a grouped matmul's extra arguments: its bias."""
    return isinstance(value, Tensor) and value.is_floating_point()


class _Bilinear(torch.autograd.Function):
    """``func(A, B, *rest)`` linear in A and in B: the tangent is func(dA, B) + func(A, dB).

    A tensor in ``rest`` that carries a tangent enters the first term in its own slot (a
    grouped matmul's bias: func(dA, B, offs, dbias) adds dbias once).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(func: Callable[..., Any], a: Tensor, b: Tensor, *rest: Any) -> Tensor:
        return func(a, b, *rest)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        func, a, b, *rest = inputs
        ctx.func, ctx.rest = func, rest
        ctx.save_for_forward(a, b)

    @staticmethod
    def jvp(ctx: Any, _: Any, d_a: Tensor | None, d_b: Tensor | None, *d_rest: Any) -> Tensor:
        a, b = ctx.saved_tensors
        shifts = [_is_shift(r) for r in ctx.rest]
        with_shift = [d if shift else r for r, d, shift in zip(ctx.rest, d_rest, shifts, strict=True)]
        no_shift = [None if shift else r for r, shift in zip(ctx.rest, shifts, strict=True)]
        if d_a is None and any(d is not None for d in d_rest):
            d_a = torch.zeros_like(a)
        terms = []
        if d_a is not None:
            terms.append(ctx.func(d_a, b, *with_shift))
        if d_b is not None:
            terms.append(ctx.func(a, d_b, *no_shift))
        if not terms:
            return torch.zeros_like(ctx.func(a, b, *ctx.rest))
        return terms[0] if len(terms) == 1 else terms[0] + terms[1]

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:
        raise RuntimeError("stepguard's grouped-matmul rule has a forward-mode derivative only")


@contextlib.contextmanager
def forward_rules(
    chunk_size: int = DEFAULT_CHUNK_SIZE, *, route: bool = True
) -> Iterator[ForwardRules | None]:
    """Eager execution of compiled code and, with ``route``, the rules of :class:`ForwardRules`.

    Yields the active :class:`ForwardRules`, or None without ``route``.
    """
    with contextlib.ExitStack() as stack:
        stance = getattr(torch.compiler, "set_stance", None)
        if stance is not None:
            stack.enter_context(stance("force_eager"))
        yield stack.enter_context(ForwardRules(chunk_size)) if route else None


# ---------------------------------------------------------------- naming a missing rule


_OP_PATTERNS = (
    re.compile(r"forward AD with (?:aten::)?([\w.:]+) that does not support it"),
    re.compile(r"(?:aten::)?([\w.:]+) does not support forward[- ]mode", re.IGNORECASE),
)


@dataclass(frozen=True)
class ForwardADGap:
    """An op without a forward-mode rule and where the model called it.

    Attributes:
        op: the op's name as PyTorch reports it (``"_grouped_mm"``), or the error's first line.
        module: qualified name of the innermost submodule of the model on the call stack
            (``""``: the model itself; ``None``: not found).
        module_type: that module's class name.
    """

    op: str
    module: str | None
    module_type: str | None

    def where(self) -> str:
        """'in module `layers.0.mlp` (MixtralExperts)', or '' when no module was found."""
        if self.module is None:
            return ""
        name = self.module or "<the model itself>"
        return f" in module `{name}` ({self.module_type})"


def describe_gap(exc: BaseException, model: nn.Module) -> ForwardADGap:
    """The op named in a forward-mode error and the model's module that called it."""
    text = str(exc)
    op = None
    for pattern in _OP_PATTERNS:
        found = pattern.search(text)
        if found:
            op = found.group(1)
            break
    if op is None and "custom autograd.Function" in text:
        op = _innermost_function(exc.__traceback__) or "a custom autograd.Function without jvp"
    if op is None:
        op = text.splitlines()[0][:200] if text else type(exc).__name__
    module, kind = _calling_module(exc.__traceback__, model)
    return ForwardADGap(op=op, module=module, module_type=kind)


def _frames(tb: TracebackType | None) -> Iterator[Any]:
    while tb is not None:
        yield tb.tb_frame
        tb = tb.tb_next


def _calling_module(tb: TracebackType | None, model: nn.Module) -> tuple[str | None, str | None]:
    names = {id(m): n for n, m in model.named_modules()}
    found: tuple[str | None, str | None] = (None, None)
    for frame in _frames(tb):
        owner = frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and id(owner) in names:
            found = (names[id(owner)], type(owner).__name__)
    return found


def _innermost_function(tb: TracebackType | None) -> str | None:
    name = None
    for frame in _frames(tb):
        cls = frame.f_locals.get("cls")
        if isinstance(cls, type) and issubclass(cls, torch.autograd.Function):
            name = cls.__name__
    return name


class ForwardADUnsupportedError(NotImplementedError):
    """``estimator="jvp"`` was forced and an op of the model has no forward-mode rule.

    Attributes:
        gap: the op and the module that called it.
    """

    def __init__(self, gap: ForwardADGap) -> None:
        self.gap = gap
        super().__init__(
            f"forward-mode AD has no rule for `{gap.op}`{gap.where()}, so estimator='jvp' cannot "
            "measure this model. Fix: use estimator='auto' (the logit velocities then come from a "
            "central finite difference, two extra forwards per direction), or make that module "
            "use ops with a forward-mode rule (a custom autograd.Function needs a jvp staticmethod; "
            "see the Models page for the architectures covered)"
        )


_warned: set[str] = set()


class FiniteDifferenceWarning(UserWarning):
    """The logit velocities come from a finite difference: an op has no forward-mode rule."""


def warn_fallback(gap: ForwardADGap) -> None:
    """Warn once per op and process that the measurement falls back to a finite difference."""
    if gap.op in _warned:
        return
    _warned.add(gap.op)
    warnings.warn(
        f"forward-mode AD has no rule for `{gap.op}`{gap.where()}; StepGuard measures the logit "
        "velocities of this model with a central finite difference (estimator "
        "'finite_difference'). See the Models page for the architectures the JVP covers",
        FiniteDifferenceWarning,
        stacklevel=3,
    )
