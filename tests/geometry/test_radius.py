"""``stepguard.radius`` against independent computations: a float64 finite difference and a
per-sample autograd Jacobian; plus masks, sequences, binary heads, replay and bad input."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import stepguard
from stepguard.geometry.jvp import Batch, logit_velocities


def mlp(k: int = 4, dtype: torch.dtype = torch.float64) -> nn.Module:
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, k)).to(dtype)


def random_direction(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: torch.randn_like(p) for n, p in model.named_parameters()}


def unit(direction: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    norm = math.sqrt(sum(float((t * t).sum()) for t in direction.values()))
    return {n: t / norm for n, t in direction.items()}


def velocities_by_jacobian(model: nn.Module, x: torch.Tensor, v: dict[str, torch.Tensor]) -> torch.Tensor:
    """a = J·v with J the full Jacobian of the logits w.r.t. the flat parameter vector."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])

    def logits(theta: torch.Tensor) -> torch.Tensor:
        parts, offset = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            n = math.prod(shape)
            parts[name] = theta[offset : offset + n].reshape(shape)
            offset += n
        return torch.func.functional_call(model, parts, (x,))

    jac = torch.autograd.functional.jacobian(logits, flat)  # (N, K, P)
    vflat = torch.cat([v[n].reshape(-1) for n in names])
    return jac @ vflat


def velocities_by_difference(model: nn.Module, x: torch.Tensor, v: dict[str, torch.Tensor], eps=1e-6):
    """Central difference (z(θ + εv) − z(θ − εv))/2ε in float64."""
    params = dict(model.named_parameters())

    def logits(theta: dict[str, torch.Tensor]) -> torch.Tensor:
        out = torch.func.functional_call(model, theta, (x,))
        return getattr(out, "logits", out)

    with torch.no_grad():
        plus = logits({n: p + eps * v[n] for n, p in params.items()})
        minus = logits({n: p - eps * v[n] for n, p in params.items()})
    return (plus - minus) / (2 * eps)


def test_radius_matches_the_full_jacobian_and_a_finite_difference() -> None:
    model, x = mlp(), torch.randn(9, 6, dtype=torch.float64)
    d = random_direction(model)
    result = stepguard.radius(model, x, d)
    a_jac = velocities_by_jacobian(model, x, unit(d))
    a_fd = velocities_by_difference(model, x, unit(d))
    assert torch.allclose(a_jac, a_fd, rtol=1e-7, atol=1e-9)
    assert torch.allclose(result.velocity, a_jac, rtol=1e-12, atol=1e-12)
    delta = float((a_jac.max(1).values - a_jac.min(1).values).max())
    assert result.delta_a == pytest.approx(delta, rel=1e-12)
    assert result.rho_a == pytest.approx(math.pi / delta, rel=1e-12)
    assert result.estimator == "jvp"


def test_radius_depends_on_the_direction_not_its_length_or_sign() -> None:
    model, x = mlp(), torch.randn(5, 6, dtype=torch.float64)
    d = random_direction(model)
    base = stepguard.radius(model, x, d).rho_a
    assert stepguard.radius(model, x, {n: 37.0 * t for n, t in d.items()}).rho_a == pytest.approx(
        base, rel=1e-12
    )
    assert stepguard.radius(model, x, {n: -t for n, t in d.items()}).rho_a == pytest.approx(base, rel=1e-12)


def test_sequence_direction_aligned_with_parameters() -> None:
    model, x = mlp(), torch.randn(5, 6, dtype=torch.float64)
    d = random_direction(model)
    by_name = stepguard.radius(model, x, d).rho_a
    assert stepguard.radius(model, x, list(d.values())).rho_a == pytest.approx(by_name, rel=1e-15)


def test_several_directions_in_one_call_match_separate_calls() -> None:
    model, x = mlp(), torch.randn(7, 6, dtype=torch.float64)
    ds = [random_direction(model) for _ in range(3)]
    together = stepguard.radius(model, x, directions=ds)
    for d, res in zip(ds, together, strict=True):
        alone = stepguard.radius(model, x, d)
        assert res.rho_a == pytest.approx(alone.rho_a, rel=1e-12)
        assert torch.allclose(res.spread, alone.spread, rtol=1e-12)


def test_frozen_parameters_are_not_part_of_the_direction() -> None:
    model, x = mlp(), torch.randn(5, 6, dtype=torch.float64)
    model[0].weight.requires_grad_(False)
    d = {n: torch.randn_like(p) for n, p in model.named_parameters() if p.requires_grad}
    full = {**d, "0.weight": torch.zeros_like(model[0].weight)}
    expected = velocities_by_jacobian(model, x, unit(full))
    result = stepguard.radius(model, x, d)
    assert torch.allclose(result.velocity, expected, rtol=1e-10, atol=1e-12)


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 11, dim: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> SimpleNamespace:
        h = torch.tanh(self.mix(self.emb(tokens)))
        return SimpleNamespace(logits=self.head(h))


def test_sequence_logits_count_only_labelled_positions() -> None:
    model = TinyLM().double()
    tokens = torch.randint(0, 11, (3, 5))
    targets = torch.randint(0, 11, (3, 5))
    targets[0, 3:] = -100  # ignored positions
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[2, 0] = False  # padding
    d = random_direction(model)
    result = stepguard.radius(model, tokens, d, targets=targets, mask=mask)
    a = velocities_by_difference(model, tokens, unit(d))
    keep = (targets != -100) & mask
    spreads = (a.max(-1).values - a.min(-1).values)[keep]
    assert result.spread.numel() == int(keep.sum())
    assert torch.allclose(result.spread, spreads, rtol=1e-7)
    assert result.delta_a == pytest.approx(float(spreads.max()), rel=1e-7)
    assert torch.equal(result.positions, keep.reshape(-1).nonzero().squeeze(1))
    unmasked = stepguard.radius(model, tokens, d)
    assert unmasked.delta_a >= result.delta_a


def test_one_logit_head_uses_the_pair_and_the_exact_binary_radius() -> None:
    model, x = mlp(k=1), torch.randn(8, 6, dtype=torch.float64)
    d = random_direction(model)
    result = stepguard.radius(model, x, d)
    a = velocities_by_jacobian(model, x, unit(d))[:, 0]
    s = model(x).detach()[:, 0]
    assert result.delta_a == pytest.approx(float(a.abs().max()), rel=1e-12)
    exact = float((torch.sqrt(s**2 + math.pi**2) / a.abs()).min())
    assert result.rho_binary == pytest.approx(exact, rel=1e-12)
    assert result.rho_binary >= result.rho_a


def test_two_logit_head_binary_radius_uses_the_margin() -> None:
    model, x = mlp(k=2), torch.randn(8, 6, dtype=torch.float64)
    d = random_direction(model)
    result = stepguard.radius(model, x, d)
    a = velocities_by_jacobian(model, x, unit(d))
    z = model(x).detach()
    exact = torch.sqrt((z[:, 1] - z[:, 0]) ** 2 + math.pi**2) / (a[:, 1] - a[:, 0]).abs()
    assert result.rho_binary == pytest.approx(float(exact.min()), rel=1e-12)


def test_temperature_scales_the_radius() -> None:
    model, x = mlp(), torch.randn(5, 6, dtype=torch.float64)
    d = random_direction(model)
    assert stepguard.radius(model, x, d, temperature=3.0).rho_a == pytest.approx(
        3.0 * stepguard.radius(model, x, d).rho_a, rel=1e-12
    )


def test_logits_from_dict_attribute_and_logits_fn() -> None:
    class DictOut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(6, 3).double()

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"logits": self.lin(x), "hidden": x}

    model, x = DictOut(), torch.randn(4, 6, dtype=torch.float64)
    d = random_direction(model)
    from_dict = stepguard.radius(model, x, d).rho_a
    via_fn = stepguard.radius(model, x, d, logits_fn=lambda out: out["logits"]).rho_a
    assert from_dict == pytest.approx(via_fn, rel=1e-15)


class NoForwardAD(torch.autograd.Function):
    """tanh with a backward but no forward-mode rule."""

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


class OpaqueNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 10), nn.Linear(10, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(NoForwardAD.apply(self.a(x)))


def test_finite_difference_fallback_when_forward_ad_is_missing(caplog: pytest.LogCaptureFixture) -> None:
    model = OpaqueNet().double()
    x = torch.randn(6, 6, dtype=torch.float64)
    d = random_direction(model)
    with pytest.raises(Exception):  # noqa: B017 - torch's own error type varies by version
        stepguard.radius(model, x, d, estimator="jvp")
    result = stepguard.radius(model, x, d)
    assert result.estimator == "finite_difference"
    exact = velocities_by_jacobian(model, x, unit(d))
    assert torch.allclose(result.velocity, exact, rtol=1e-6, atol=1e-8)


def test_train_mode_replay_uses_the_captured_dropout_mask_and_batch_statistics() -> None:
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))
    model.train()
    x = torch.randn(10, 6)
    captured = []
    model.register_forward_pre_hook(
        lambda m, args, kwargs: captured.append(Batch.capture(m, args, kwargs)), with_kwargs=True
    )
    train_logits = model(x).detach()
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    params = {n: p.detach() for n, p in model.named_parameters()}
    tangent = unit({n: torch.randn_like(p) for n, p in params.items()})
    rng_after = torch.get_rng_state()
    z, _, _ = logit_velocities(model, params, [tangent], captured[-1], mode="train")
    assert torch.equal(z, train_logits)  # same mask, same batch statistics
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), f"buffer {n} changed"
    assert torch.equal(torch.get_rng_state(), rng_after)
    assert model.training and model[1].track_running_stats
    z_eval, _, _ = logit_velocities(model, params, [tangent], captured[-1], mode="eval")
    model.eval()
    with torch.no_grad():
        assert torch.allclose(z_eval, model(x), atol=1e-6)
    assert not torch.equal(z_eval, train_logits)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda m, x, d: stepguard.radius(lambda t: t, x, d), TypeError, "nn.Module"),
        (lambda m, x, d: stepguard.radius(m, x, {"nope": torch.zeros(1)}), ValueError, "not parameters"),
        (lambda m, x, d: stepguard.radius(m, x, {"0.weight": torch.zeros(2, 2)}), ValueError, "shape"),
        (lambda m, x, d: stepguard.radius(m, x, [torch.zeros(1)]), ValueError, "align"),
        (
            lambda m, x, d: stepguard.radius(m, x, {n: torch.zeros_like(t) for n, t in d.items()}),
            ValueError,
            "norm",
        ),
        (lambda m, x, d: stepguard.radius(m, x, d, logits_fn=lambda o: o.argmax(-1)), TypeError, "integer"),
        (
            lambda m, x, d: stepguard.radius(m, x, d, logits_fn=lambda o: o.to(torch.complex128)),
            TypeError,
            "complex",
        ),
        (lambda m, x, d: stepguard.radius(m, x, d, logits_fn=lambda o: [o]), TypeError, "torch.Tensor"),
        (
            lambda m, x, d: stepguard.radius(m, x, d, targets=torch.zeros(3, dtype=torch.long)),
            ValueError,
            "targets",
        ),
        (lambda m, x, d: stepguard.radius(m, x), ValueError, "exactly one"),
    ],
)
def test_bad_input_gets_a_clear_error(call, error, match) -> None:
    model, x = mlp(), torch.randn(4, 6, dtype=torch.float64)
    with pytest.raises(error, match=match):
        call(model, x, random_direction(model))


def test_output_without_logits_is_a_clear_error() -> None:
    class Weird(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x):
            return ("not", "logits")

    model = Weird()
    with pytest.raises(TypeError, match="cannot find logits"):
        stepguard.radius(model, torch.randn(3, 2), random_direction(model))
