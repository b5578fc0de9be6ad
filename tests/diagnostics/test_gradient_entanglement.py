"""Gradient entanglement against separate autograd passes and finite differences (float64)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call

from stepguard.diagnostics import EntanglementProbe, entanglement


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5)).double()


def sequence_logp(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sequence summed token log-likelihoods: x (B, T, 4), y (B, T) → (B,)."""
    logp = torch.log_softmax(model(x), dim=-1)
    return logp.gather(-1, y[..., None]).squeeze(-1).sum(-1)


def data(seed: int = 1, batch: int = 3, length: int = 4):
    gen = torch.Generator().manual_seed(seed)
    x_w = torch.randn(batch, length, 4, generator=gen, dtype=torch.float64)
    x_l = torch.randn(batch, length, 4, generator=gen, dtype=torch.float64)
    y_w = torch.randint(0, 5, (batch, length), generator=gen)
    y_l = torch.randint(0, 5, (batch, length), generator=gen)
    return x_w, y_w, x_l, y_l


def flat_grad(value: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    grads = torch.autograd.grad(value, params, retain_graph=True)
    return torch.cat([g.reshape(-1) for g in grads])


def test_gram_matches_separate_backward_passes():
    model = make_model()
    params = list(model.parameters())
    x_w, y_w, x_l, y_l = data()
    lw, ll = sequence_logp(model, x_w, y_w), sequence_logp(model, x_l, y_l)
    objectives = {"chosen": lw.sum(), "rejected": ll.sum(), "logz": model(x_w).logsumexp(-1).mean()}
    result = entanglement(objectives, model)
    grads = torch.stack([flat_grad(v, params) for v in objectives.values()])
    expected = grads @ grads.T
    assert result.names == ("chosen", "rejected", "logz")
    assert result.gram.dtype == torch.float64
    torch.testing.assert_close(result.gram, expected, rtol=1e-12, atol=1e-12)
    norms = grads.norm(dim=1)
    torch.testing.assert_close(result.cosine, expected / torch.outer(norms, norms), rtol=1e-12, atol=1e-12)
    g_wl, g_ww, g_ll = expected[0, 1], expected[0, 0], expected[1, 1]
    torch.testing.assert_close(result.ratio_chosen, g_wl / g_ww)
    torch.testing.assert_close(result.ratio_rejected, g_wl / g_ll)


def test_one_batched_vjp_and_the_graph_survives(monkeypatch):
    model = make_model()
    x_w, y_w, x_l, y_l = data()
    lw, ll = sequence_logp(model, x_w, y_w), sequence_logp(model, x_l, y_l)
    calls = []
    original = torch.autograd.grad

    def counting_grad(*args, **kwargs):
        calls.append(kwargs.get("is_grads_batched", False))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    entanglement({"chosen": lw.sum(), "rejected": ll.sum()}, model)
    entanglement({"chosen": lw, "rejected": ll}, model, per_sample=True)
    assert calls == [True, True]
    monkeypatch.undo()
    (ll - lw).mean().backward()  # the training loss can still backpropagate
    assert all(p.grad is not None for p in model.parameters())


def test_fallback_without_batching_gives_the_same_gram(monkeypatch):
    model = make_model()
    x_w, y_w, x_l, y_l = data()
    objectives = {
        "chosen": sequence_logp(model, x_w, y_w).sum(),
        "rejected": sequence_logp(model, x_l, y_l).sum(),
    }
    batched = entanglement(objectives, model)
    original = torch.autograd.grad

    def no_batching(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            raise RuntimeError("Batching rule not implemented for aten::something (vmap)")
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", no_batching)
    with pytest.warns(RuntimeWarning, match="backward passes"):
        fallback = entanglement(objectives, model)
    torch.testing.assert_close(fallback.gram, batched.gram, rtol=1e-12, atol=1e-12)


def test_per_sample_gram_matches_per_sample_backward_passes():
    model = make_model()
    params = list(model.parameters())
    x_w, y_w, x_l, y_l = data(batch=4)
    lw, ll = sequence_logp(model, x_w, y_w), sequence_logp(model, x_l, y_l)
    len_w = torch.tensor([4.0, 2.0, 7.0, 3.0])
    len_l = torch.tensor([3.0, 5.0, 7.0, 1.0])
    result = entanglement(
        {"chosen": lw, "rejected": ll},
        params,
        per_sample=True,
        lengths={"chosen": len_w, "rejected": len_l},
    )
    assert result.gram.shape == (4, 2, 2)
    for b in range(4):
        gw, gl = flat_grad(lw[b], params), flat_grad(ll[b], params)
        expected = torch.tensor([[gw @ gw, gw @ gl], [gl @ gw, gl @ gl]], dtype=torch.float64)
        torch.testing.assert_close(result.gram[b], expected, rtol=1e-12, atol=1e-12)
        weight = len_l[b] / len_w[b]  # d_w / d_l for length-normalized log-likelihoods
        torch.testing.assert_close(result.ratio_chosen[b], (gw @ gl) / (weight * (gw @ gw)))
        torch.testing.assert_close(result.ratio_rejected[b], weight * (gw @ gl) / (gl @ gl))
    with pytest.raises(ValueError, match="scalars"):
        result.scalars()


def objective_values(model: nn.Module, theta: dict[str, torch.Tensor], batch, alpha: float) -> torch.Tensor:
    """ℓ_w and ℓ_l = α·ℓ_w + 0.05·(another sequence): α sets how entangled they are."""
    x_w, y_w, x_l, y_l = batch

    def logp(x, y):
        out = functional_call(model, theta, (x,))
        return torch.log_softmax(out, -1).gather(-1, y[..., None]).squeeze(-1).sum()

    lw = logp(x_w, y_w)
    return torch.stack([lw, alpha * lw + 0.05 * logp(x_l, y_l)])


def central_difference(model, batch, alpha, direction: list[torch.Tensor], h: float = 1e-5) -> torch.Tensor:
    names = [n for n, _ in model.named_parameters()]
    base = {n: p.detach() for n, p in model.named_parameters()}
    plus = {n: base[n] + h * d for n, d in zip(names, direction, strict=True)}
    minus = {n: base[n] - h * d for n, d in zip(names, direction, strict=True)}
    return (objective_values(model, plus, batch, alpha) - objective_values(model, minus, batch, alpha)) / (
        2 * h
    )


def test_realized_change_matches_a_central_finite_difference():
    model = make_model()
    params = list(model.parameters())
    batch = data()
    theta = dict(model.named_parameters())
    values = objective_values(model, theta, batch, alpha=0.7)
    probe = EntanglementProbe()
    probe.observe({"chosen": values[0], "rejected": values[1]}, params)
    gen = torch.Generator().manual_seed(3)
    update = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
    realized = probe.realized(update)
    expected = central_difference(model, batch, 0.7, update)
    torch.testing.assert_close(
        torch.stack([realized["chosen"], realized["rejected"]]), expected, rtol=1e-7, atol=1e-9
    )


@pytest.mark.parametrize("alpha", [-1.0, 0.3, 0.8, 1.25, 3.0])
@pytest.mark.parametrize("lengths", [None, (3.0, 6.0)])
def test_ratios_predict_which_likelihood_moves_the_wrong_way(alpha, lengths):
    # A margin step Δθ = η(d_w∇ℓ_w − d_l∇ℓ_l): DPO has d_w = d_l; a length-normalized loss
    # on summed log-likelihoods has d_w = 1/|y_w|, d_l = 1/|y_l|.
    model = make_model()
    params = list(model.parameters())
    batch = data()
    values = objective_values(model, dict(model.named_parameters()), batch, alpha)
    g_w, g_l = (torch.autograd.grad(v, params, retain_graph=True) for v in values)
    d_w, d_l = (1.0, 1.0) if lengths is None else (1 / lengths[0], 1 / lengths[1])
    step = [1e-2 * (d_w * a - d_l * b) for a, b in zip(g_w, g_l, strict=True)]
    change = central_difference(model, batch, alpha, step)
    kwargs = {} if lengths is None else {"lengths": {"chosen": lengths[0], "rejected": lengths[1]}}
    result = entanglement({"chosen": values[0], "rejected": values[1]}, params, **kwargs)
    assert (result.ratio_chosen.item() > 1) == (change[0].item() < 0)
    assert (result.ratio_rejected.item() > 1) == (change[1].item() > 0)


def test_rejected_rising_is_flagged_although_the_chosen_norm_is_larger():
    # ‖∇ℓ_l‖² < ⟨∇ℓ_w, ∇ℓ_l⟩ < ‖∇ℓ_w‖²: the chosen likelihood rises, the rejected one rises
    # too. A condition built on min(‖∇ℓ_w‖², ‖∇ℓ_w‖²) would miss it.
    model = make_model()
    params = list(model.parameters())
    batch = data()
    values = objective_values(model, dict(model.named_parameters()), batch, alpha=0.5)
    result = entanglement({"chosen": values[0], "rejected": values[1]}, params)
    g = result.gram
    assert g[1, 1] < g[0, 1] < g[0, 0]
    assert result.ratio_chosen.item() < 1 < result.ratio_rejected.item()
    g_w, g_l = (torch.autograd.grad(v, params, retain_graph=True) for v in values)
    step = [1e-2 * (a - b) for a, b in zip(g_w, g_l, strict=True)]
    change = central_difference(model, batch, 0.5, step)
    assert change[0] > 0 and change[1] > 0


def test_probe_scalars_and_lifecycle():
    model = make_model()
    x_w, y_w, x_l, y_l = data()
    lw, ll = sequence_logp(model, x_w, y_w).sum(), sequence_logp(model, x_l, y_l).sum()
    probe = EntanglementProbe()
    assert probe.scalars() == {}
    with pytest.raises(RuntimeError):
        probe.realized([torch.zeros_like(p) for p in model.parameters()])
    result = probe.observe({"chosen": lw, "rejected": ll}, model)
    scalars = probe.scalars()
    assert set(scalars) == {
        "gram.chosen.chosen",
        "gram.chosen.rejected",
        "gram.rejected.rejected",
        "cosine.chosen.rejected",
        "ratio_chosen",
        "ratio_rejected",
    }
    assert all(v.dim() == 0 for v in scalars.values())
    assert scalars["gram.chosen.rejected"] == result.gram[0, 1]
    update = [p.detach().clone() for p in model.parameters()]
    realized = probe.realized(update)
    assert set(probe.scalars()) - set(scalars) == {"realized.chosen", "realized.rejected"}
    # Along Δθ = θ, the realized change of ℓ_w is ⟨∇ℓ_w, θ⟩.
    params = list(model.parameters())
    expected = flat_grad(lw, params) @ torch.cat([p.detach().reshape(-1) for p in params])
    torch.testing.assert_close(realized["chosen"], expected)
    with pytest.raises(ValueError):
        probe.realized(update[:-1])
    probe.observe({"chosen": lw, "rejected": ll}, model)
    assert "realized.chosen" not in probe.scalars()
    probe.clear()
    assert probe.scalars() == {} and probe.result is None


def test_module_params_skip_frozen_ones_and_unused_params_contribute_zero():
    model = make_model()
    model[0].bias.requires_grad_(False)
    x_w, y_w, x_l, y_l = data()
    lw, ll = sequence_logp(model, x_w, y_w).sum(), sequence_logp(model, x_l, y_l).sum()
    trainable = [p for p in model.parameters() if p.requires_grad]
    from_module = entanglement({"chosen": lw, "rejected": ll}, model)
    from_list = entanglement({"chosen": lw, "rejected": ll}, trainable)
    torch.testing.assert_close(from_module.gram, from_list.gram)
    unused = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with_unused = entanglement({"chosen": lw, "rejected": ll}, [*trainable, unused])
    torch.testing.assert_close(with_unused.gram, from_list.gram)
    # A frozen tensor in an explicit list (e.g. an optimizer's param group) contributes 0.
    everything = list(model.parameters())
    with_frozen = entanglement({"chosen": lw, "rejected": ll}, everything)
    torch.testing.assert_close(with_frozen.gram, from_list.gram)
    probe = EntanglementProbe()
    probe.observe({"chosen": lw, "rejected": ll}, [*everything, unused])
    realized = probe.realized([torch.ones_like(p) for p in [*everything, unused]])
    expected = flat_grad(lw, trainable) @ torch.ones(sum(p.numel() for p in trainable), dtype=torch.float64)
    torch.testing.assert_close(realized["chosen"], expected)


def test_zero_gradient_gives_zero_ratio_and_cosine():
    w = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    result = entanglement({"chosen": (w * 0).sum(), "rejected": (w**2).sum()}, [w])
    assert result.ratio_chosen.item() == 0.0 and result.ratio_rejected.item() == 0.0
    assert result.cosine[0, 1].item() == 0.0


def test_without_a_pair_there_are_no_ratios_and_bad_inputs_raise():
    w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64, requires_grad=True)
    # ∇(w·a) = a, ∇(w·b) = b: G = [[a·a, a·b], [b·a, b·b]].
    a = torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64)
    b = torch.tensor([0.0, 3.0, 1.0], dtype=torch.float64)
    result = entanglement({"task": w @ a, "aux": w @ b}, [w])
    torch.testing.assert_close(result.gram, torch.tensor([[5.0, 2.0], [2.0, 10.0]], dtype=torch.float64))
    assert result.ratio_chosen is None and result.pair is None
    assert set(result.scalars()) == {"gram.task.task", "gram.task.aux", "gram.aux.aux", "cosine.task.aux"}
    custom = entanglement({"w": w @ a, "l": w @ b}, [w], pair=("w", "l"))
    torch.testing.assert_close(custom.ratio_chosen, torch.tensor(2.0 / 5.0, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"'\.'"):
        entanglement({"a.b": w @ a}, [w])
    with pytest.raises(ValueError, match="scalar"):
        entanglement({"task": w * a}, [w])
    with pytest.raises(ValueError, match="require grad"):
        entanglement({"task": a.sum()}, [w])
    with pytest.raises(ValueError, match="lengths"):
        entanglement({"task": w @ a}, [w], lengths={"chosen": 1, "rejected": 2})
