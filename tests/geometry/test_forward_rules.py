"""The replay's forward-mode rules: grouped matmuls, nn.MultiheadAttention and
nn.TransformerEncoder fast paths, compiled code, the training forward left as it was, and
the last-resort finite difference (one warning naming the op; a clear error when forced)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from _aten_ops import AtenOps
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

import stepguard
from stepguard.geometry import forward_rules as rules
from stepguard.geometry import jvp as jvp_module
from stepguard.geometry.forward_rules import (
    FiniteDifferenceWarning,
    ForwardADUnsupportedError,
    ForwardRules,
    _Bilinear,
)
from stepguard.geometry.jvp import Batch, logit_velocities


def relative_error(a: Tensor, ref: Tensor) -> float:
    return float((a - ref).abs().max() / ref.abs().max())


def direction(model: nn.Module) -> dict[str, Tensor]:
    return {n: torch.randn_like(p) for n, p in model.named_parameters()}



# ---------------------------------------------------------------- grouped matmul


def grouped_by_loop(a: Tensor, w: Tensor, offs: Tensor) -> Tensor:
    starts = [0, *offs.tolist()[:-1]]
    return torch.cat([a[s:e] @ w[g] for g, (s, e) in enumerate(zip(starts, offs.tolist(), strict=True))])


def test_grouped_mm_gets_the_rule_of_a_bilinear_map() -> None:
    a, w = torch.randn(9, 8), torch.randn(3, 8, 4)  # the kernel wants 16-byte strides
    da, dw = torch.randn_like(a), torch.randn_like(w)
    offs = torch.tensor([2, 2, 9], dtype=torch.int32)  # the second group is empty
    with pytest.raises(NotImplementedError, match="_grouped_mm"):
        torch.func.jvp(lambda x, y: torch._grouped_mm(x, y, offs=offs), (a, w), (da, dw))
    _, ref = torch.func.jvp(lambda x, y: grouped_by_loop(x, y, offs), (a, w), (da, dw))
    with ForwardRules():
        out, tangent = torch.func.jvp(lambda x, y: F.grouped_mm(x, y, offs=offs), (a, w), (da, dw))
        _, only_w = torch.func.jvp(lambda y: torch._grouped_mm(a, y, offs), (w,), (dw,))
    assert torch.allclose(out, grouped_by_loop(a, w, offs), atol=1e-6)
    assert relative_error(tangent, ref) < 1e-6
    assert relative_error(only_w, grouped_by_loop(a, dw, offs)) < 1e-6


def test_grouped_mm_through_torch_ops_and_transformers_fallback() -> None:
    a, w = torch.randn(9, 8), torch.randn(3, 8, 4)
    da, dw = torch.randn_like(a), torch.randn_like(w)
    offs = torch.tensor([4, 6, 9], dtype=torch.int32)
    _, ref = torch.func.jvp(lambda x, y: grouped_by_loop(x, y, offs), (a, w), (da, dw))
    ops = [torch.ops.aten._grouped_mm, torch.ops.aten._grouped_mm.default]
    pytest.importorskip("transformers.integrations.moe")  # registers transformers' fallback op
    if hasattr(torch.ops.transformers, "grouped_mm_fallback"):
        ops.append(torch.ops.transformers.grouped_mm_fallback)
    for op in ops:
        with ForwardRules() as routed:
            _, tangent = torch.func.jvp(lambda x, y, op=op: op(x, y, offs), (a, w), (da, dw))
        assert routed.fired == 1
        assert relative_error(tangent, ref) < 1e-6, op


def test_a_bias_tangent_enters_the_bilinear_rule_once() -> None:
    a, b, bias = torch.randn(5, 3), torch.randn(3, 4), torch.randn(4)
    da, db, dbias = torch.randn_like(a), torch.randn_like(b), torch.randn_like(bias)

    def affine(x: Tensor, y: Tensor, c: Tensor | None = None) -> Tensor:
        return x @ y if c is None else x @ y + c

    _, ref = torch.func.jvp(affine, (a, b, bias), (da, db, dbias))
    _, tangent = torch.func.jvp(lambda *t: _Bilinear.apply(affine, *t), (a, b, bias), (da, db, dbias))
    assert relative_error(tangent, ref) < 1e-6
    _, bias_only = torch.func.jvp(lambda c: _Bilinear.apply(affine, a, b, c), (bias,), (dbias,))
    assert torch.allclose(bias_only, dbias.expand(5, 4))


# ---------------------------------------------------------------- nn.TransformerEncoder


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 7)

    def forward(self, tokens: Tensor, padding: Tensor | None = None) -> Tensor:
        return self.head(self.encoder(self.embed(tokens), src_key_padding_mask=padding))


def composite_reference(model: nn.Module, inputs: tuple, tangent: dict[str, Tensor]) -> Tensor:
    """The encoder's JVP through its composite path (train mode without dropout, math attention)."""
    reference = copy.deepcopy(model).train()
    params = {n: p.detach() for n, p in reference.named_parameters()}
    with sdpa_kernel(SDPBackend.MATH):
        return torch.func.jvp(
            lambda theta: torch.func.functional_call(reference, theta, inputs), (params,), (tangent,)
        )[1]


@pytest.mark.parametrize("padded", [False, True])
def test_transformer_encoder_fast_path_is_measured_by_the_jvp(padded: bool) -> None:
    model = Encoder().eval()
    tokens = torch.randint(0, 50, (2, 12))
    padding = torch.zeros(2, 12, dtype=torch.bool)
    padding[1, 8:] = True
    inputs = (tokens, padding) if padded else (tokens,)
    with torch.no_grad(), AtenOps() as ops:
        model(*inputs)
    assert "aten::_transformer_encoder_layer_fwd" in ops.names  # what inference runs
    d = direction(model)
    params = {n: p for n, p in model.named_parameters()}
    z, a, used = logit_velocities(model, params, [d], Batch.from_inputs(inputs), estimator="jvp")
    assert used == "jvp"
    ref = composite_reference(model, inputs, d)
    keep = ~padding if padded else torch.ones_like(padding)
    assert relative_error(a[0][keep], ref[keep]) < 1e-5
    assert torch.allclose(z[keep], model(*inputs)[keep], atol=1e-5)


def test_multihead_attention_without_weights_in_train_mode() -> None:
    mha = nn.MultiheadAttention(16, 2, batch_first=True)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mha, self.head = mha, nn.Linear(16, 3)

        def forward(self, x: Tensor) -> Tensor:
            out, _ = self.mha(x, x, x, need_weights=False, is_causal=True,
                              attn_mask=nn.Transformer.generate_square_subsequent_mask(x.size(1)))
            return self.head(out)

    model, x = Net(), torch.randn(2, 9, 16)
    d = direction(model)
    result = stepguard.radius(model, x, d, estimator="jvp")
    ref = composite_reference(model, (x,), {n: t / _norm(d) for n, t in d.items()})
    assert result.estimator == "jvp"
    assert relative_error(result.velocity, ref.reshape(-1, 3)) < 1e-5


def _norm(d: dict[str, Tensor]) -> float:
    return float(torch.sqrt(sum((t * t).sum() for t in d.values())))


# ---------------------------------------------------------------- compiled code, the training forward


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.out = nn.Linear(16, 48), nn.Linear(16, 5)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv(x).view(x.size(0), x.size(1), 3, 2, 8).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(x.size(0), x.size(1), 16))


def test_a_compiled_model_is_replayed_eagerly_through_the_rules() -> None:
    model, x = Attention(), torch.randn(2, 6, 16)
    compiled = torch.compile(model)
    d = direction(model)
    eager = stepguard.radius(model, x, d)
    result = stepguard.radius(compiled, x, {f"_orig_mod.{n}": t for n, t in d.items()})
    assert result.estimator == eager.estimator == "jvp"
    assert torch.equal(result.velocity, eager.velocity)


def test_the_training_forward_is_untouched_after_a_measurement() -> None:
    model, x = Attention(), torch.randn(2, 6, 16)
    with AtenOps() as before:
        out_before = model(x)
    stepguard.radius(model, x, direction(model))
    with AtenOps() as after:
        out_after = model(x)
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in before.names
    assert after.names == before.names
    assert torch.equal(out_after, out_before)
    assert not torch._C._is_torch_function_mode_enabled()
    out_after.sum().backward()  # training's backward still has its kernels' derivatives
    assert all(p.grad is not None for p in model.parameters())


def test_the_replay_logits_are_the_training_forwards() -> None:
    model, x = Attention(), torch.randn(2, 6, 16)
    params = dict(model.named_parameters())
    z, _, used = logit_velocities(model, params, [direction(model)], Batch.from_inputs(x))
    assert used == "jvp"
    assert torch.equal(z, model(x).detach())


# ---------------------------------------------------------------- the last resort


class FusedKernelCall(nn.Module):
    """Calls a fused attention kernel directly, past every rule."""

    def forward(self, x: Tensor) -> Tensor:
        q = x.unsqueeze(1)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, q, q)[0].squeeze(1)


class Uncovered(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj, self.mix, self.head = nn.Linear(8, 8), FusedKernelCall(), nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.mix(self.proj(x)))


def test_finite_difference_warns_once_naming_the_op_and_module(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rules, "_warned", set())
    model, x = Uncovered(), torch.randn(2, 5, 8)
    d = direction(model)
    with pytest.warns(FiniteDifferenceWarning) as caught:
        first = stepguard.radius(model, x, d)
    message = str(caught[0].message)
    assert "`_scaled_dot_product_flash_attention_for_cpu` in module `mix` (FusedKernelCall)" in message
    assert first.estimator == "finite_difference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert stepguard.radius(model, x, d).estimator == "finite_difference"


def test_forcing_the_jvp_names_the_op_the_module_and_the_fix() -> None:
    model, x = Uncovered(), torch.randn(2, 5, 8)
    with pytest.raises(ForwardADUnsupportedError) as raised:
        stepguard.radius(model, x, direction(model), estimator="jvp")
    text = str(raised.value)
    assert "`_scaled_dot_product_flash_attention_for_cpu` in module `mix` (FusedKernelCall)" in text
    assert "estimator='auto'" in text
    assert raised.value.gap.module == "mix"
    assert isinstance(raised.value, NotImplementedError)


class NoJvp(torch.autograd.Function):
    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return x.tanh()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


def test_a_custom_function_without_jvp_is_named() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    model[1].register_forward_pre_hook(lambda m, args: (NoJvp.apply(args[0]),))
    with pytest.raises(ForwardADUnsupportedError, match="NoJvp"):
        stepguard.radius(model, torch.randn(3, 4), direction(model), estimator="jvp")


def test_chunk_size_is_checked() -> None:
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        ForwardRules(chunk_size=-1)


# ---------------------------------------------------------------- routing only where needed


class Sometimes(nn.Module):
    """Attention only for sequences longer than four: the first replay may not meet it."""

    def __init__(self) -> None:
        super().__init__()
        self.attention, self.head = Attention(), nn.Linear(16, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.attention(x) if x.size(1) > 4 else self.head(x)


def test_a_model_that_needs_no_rule_is_replayed_without_the_routing(monkeypatch: pytest.MonkeyPatch) -> None:
    model = Sometimes()
    short, long = torch.randn(2, 3, 16), torch.randn(2, 6, 16)
    stepguard.radius(model, short, direction(model))
    assert jvp_module._rules_needed[model] is False
    routed = []
    original = ForwardRules.__torch_function__
    monkeypatch.setattr(ForwardRules, "__torch_function__",
                        lambda self, *a, **kw: routed.append(1) or original(self, *a, **kw))
    assert stepguard.radius(model, short, direction(model)).estimator == "jvp"
    assert not routed
    result = stepguard.radius(model, long, direction(model), estimator="jvp")  # meets the fused kernel
    assert result.estimator == "jvp" and routed
    assert jvp_module._rules_needed[model] is True


def test_fast_path_modules_keep_the_routing() -> None:
    model = nn.Sequential(nn.Linear(16, 16), nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True))
    model.eval()
    x = torch.randn(2, 5, 16)
    stepguard.radius(model, x, direction(model), mode="eval")
    assert jvp_module._rules_needed[model] is True


class Largest(TorchDispatchMode):
    """The most elements of any tensor an op returned while active."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def test_the_replay_of_a_long_sequence_stays_within_its_chunk() -> None:
    model, x = Attention(), torch.randn(1, 128, 16)
    params = dict(model.named_parameters())
    d, batch = direction(model), Batch.from_inputs(x)
    square = 2 * 128 * 128  # heads × T × T
    with Largest() as small:
        logit_velocities(model, params, [d], batch, chunk_size=8)
    with Largest() as whole:
        logit_velocities(model, params, [d], batch, chunk_size=128)
    assert small.numel < square / 4 <= whole.numel


def test_rms_norm_and_rotary_embeddings_are_plain_ops_with_forward_rules() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm, self.proj = nn.RMSNorm(8), nn.Linear(8, 8)

        def forward(self, x: Tensor) -> Tensor:
            h = self.norm(x)
            angle = torch.arange(x.size(1)).unsqueeze(-1) * torch.linspace(0.1, 1.0, 4)
            cos, sin = angle.cos().repeat(1, 2), angle.sin().repeat(1, 2)
            rotated = torch.cat([-h[..., 4:], h[..., :4]], dim=-1)
            return self.proj(h * cos + rotated * sin)

    model, x = Block().double(), torch.randn(2, 5, 8, dtype=torch.float64)
    d = direction(model)
    result = stepguard.radius(model, x, d, estimator="jvp")
    params = {n: p.detach() for n, p in model.named_parameters()}
    eps = 1e-6
    with torch.no_grad():
        plus = torch.func.functional_call(model, {n: p + eps * d[n] / _norm(d) for n, p in params.items()}, (x,))
        minus = torch.func.functional_call(model, {n: p - eps * d[n] / _norm(d) for n, p in params.items()}, (x,))
    assert torch.allclose(result.velocity, ((plus - minus) / (2 * eps)).reshape(-1, 8), rtol=1e-6, atol=1e-8)
