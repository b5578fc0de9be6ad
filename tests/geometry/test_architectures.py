"""Real architectures, built from tiny configs, are measured by the forward-mode JVP with
their default attention: the velocities equal those of the same weights with eager attention."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from _aten_ops import AtenOps
from torch import Tensor, nn

import stepguard
from stepguard import StepGuard
from stepguard.rows import causal_lm_rows

transformers = pytest.importorskip("transformers")

VOCAB, SEQ = 96, 16
DECODER = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}


def llama() -> Any:
    return transformers.LlamaConfig(**DECODER), transformers.LlamaForCausalLM


def qwen2() -> Any:
    return transformers.Qwen2Config(**DECODER), transformers.Qwen2ForCausalLM


def mistral() -> Any:
    return transformers.MistralConfig(**DECODER, sliding_window=8), transformers.MistralForCausalLM


def mixtral() -> Any:
    config = transformers.MixtralConfig(**DECODER, num_local_experts=4, num_experts_per_tok=2)
    return config, transformers.MixtralForCausalLM


def gpt2() -> Any:
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                     bos_token_id=0, eos_token_id=0)
    return config, transformers.GPT2LMHeadModel


def bert() -> Any:
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64, num_labels=3)
    return config, transformers.BertForSequenceClassification


def vit() -> Any:
    config = transformers.ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=64, num_labels=5)
    return config, transformers.ViTForImageClassification


def tokens() -> dict[str, Tensor]:
    return {"input_ids": torch.randint(0, VOCAB, (2, SEQ))}


def padded_tokens() -> dict[str, Tensor]:
    mask = torch.ones(2, SEQ, dtype=torch.long)
    mask[1, 11:] = 0
    return {"input_ids": torch.randint(0, VOCAB, (2, SEQ)), "attention_mask": mask}


def pixels() -> dict[str, Tensor]:
    return {"pixel_values": torch.randn(2, 3, 16, 16)}


MODELS: dict[str, tuple[Callable[[], Any], Callable[[], dict[str, Tensor]]]] = {
    "llama": (llama, tokens),
    "qwen2": (qwen2, tokens),
    "mistral": (mistral, tokens),
    "mixtral": (mixtral, tokens),
    "gpt2": (gpt2, tokens),
    "bert": (bert, padded_tokens),
    "vit": (vit, pixels),
}


def build(name: str, **implementation: str) -> nn.Module:
    config, cls = MODELS[name][0]()
    return cls._from_config(config, **implementation)


def eager_twin(model: nn.Module, name: str) -> nn.Module:
    """The same weights with eager attention (and eager experts for mixture-of-experts)."""
    grouped = hasattr(model.config, "_experts_implementation")  # transformers >= 5
    extra = {"experts_implementation": "eager"} if name == "mixtral" and grouped else {}
    twin = build(name, attn_implementation="eager", **extra)
    twin.load_state_dict(model.state_dict())
    return twin.train(model.training)


def relative_error(a: Tensor, ref: Tensor) -> float:
    return float((a - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("name", list(MODELS))
def test_default_attention_is_measured_by_the_jvp_and_matches_eager(name: str) -> None:
    model = build(name).eval()
    if model.config._attn_implementation != "sdpa":
        pytest.skip(f"this transformers version gives {name} {model.config._attn_implementation} attention")
    inputs = MODELS[name][1]()
    direction = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    result = stepguard.radius(model, inputs, direction, estimator="jvp")
    reference = stepguard.radius(eager_twin(model, name), inputs, direction, estimator="jvp")
    assert result.estimator == "jvp"
    assert relative_error(result.velocity, reference.velocity) < 1e-5
    assert relative_error(result.logits, reference.logits) < 1e-5


def test_mixtral_default_experts_use_grouped_mm_and_several_directions_share_one_pass() -> None:
    model = build("mixtral").eval()
    if getattr(model.config, "_experts_implementation", None) != "grouped_mm":
        pytest.skip("this transformers version has no grouped-matmul experts")
    inputs = tokens()
    directions = [{n: torch.randn_like(p) for n, p in model.named_parameters()} for _ in range(2)]
    results = stepguard.radius(model, inputs, directions=directions, estimator="jvp")
    reference = stepguard.radius(eager_twin(model, "mixtral"), inputs, directions=directions, estimator="jvp")
    for got, ref in zip(results, reference, strict=True):
        assert got.estimator == "jvp"
        assert relative_error(got.velocity, ref.velocity) < 1e-5


def test_left_padded_llama_matches_eager_on_the_real_tokens() -> None:
    model = build("llama").eval()
    inputs = padded_tokens()
    inputs["attention_mask"] = inputs["attention_mask"].flip(-1)  # left padding, as in generation
    direction = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    mask = inputs["attention_mask"].bool()
    result = stepguard.radius(model, inputs, direction, estimator="jvp", mask=mask)
    reference = stepguard.radius(eager_twin(model, "llama"), inputs, direction, estimator="jvp", mask=mask)
    assert relative_error(result.velocity, reference.velocity) < 1e-5


def test_gpt2_in_train_mode_with_attention_dropout_is_the_training_functions_jvp() -> None:
    model = build("gpt2").train()
    assert model.config.attn_pdrop > 0
    inputs = tokens()
    direction = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    generator = torch.get_rng_state()
    result = stepguard.radius(model, inputs, direction, estimator="jvp")
    assert result.estimator == "jvp"
    # the reference: forward-mode AD through PyTorch's math attention, same dropout masks
    norm = torch.sqrt(sum((t * t).sum() for t in direction.values()))
    params = {n: p.detach() for n, p in model.named_parameters()}
    unit = {n: t / norm for n, t in direction.items()}
    torch.set_rng_state(generator)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        _, velocity = torch.func.jvp(
            lambda theta: torch.func.functional_call(model, theta, (), inputs).logits, (params,), (unit,)
        )
    torch.set_rng_state(generator)
    with torch.no_grad():
        trained = model(**inputs).logits  # the training forward: CPU attention with dropout
    assert torch.equal(result.logits, trained.reshape(-1, VOCAB))
    assert relative_error(result.velocity, velocity.reshape(-1, VOCAB)) < 1e-5


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 5)

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.head(self.encoder(self.embed(input_ids), is_causal=False))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_transformer_encoder_in_both_modes(mode: str) -> None:
    model = Encoder()
    inputs = tokens()
    direction = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    result = stepguard.radius(model, inputs, direction, estimator="jvp", mode=mode)
    # the composite path of the same layers, differentiated through math attention
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        fallback = stepguard.radius(model, inputs, direction, estimator="finite_difference", mode=mode)
    assert result.estimator == "jvp"
    assert relative_error(result.velocity, fallback.velocity) < 1e-2  # a float32 central difference



def test_a_guarded_llama_step_is_measured_by_the_jvp_and_training_keeps_its_kernels() -> None:
    model = build("llama")
    guard = StepGuard(torch.optim.SGD(model.parameters(), lr=1e-2), model=model, rows_fn=causal_lm_rows)
    ids = torch.randint(0, VOCAB, (2, SEQ))
    with AtenOps() as before:
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    report = guard.step()
    assert report.measured and report.estimator == "jvp"
    assert report.rho_a > 0
    with AtenOps() as after:
        model(input_ids=ids, labels=ids).loss.backward()  # training's backward still has its kernels' rules
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in before.names
    assert after.names[: len(before.names)] == before.names
