"""The tiny Llama of the distributed examples: its arguments, its data and its model.

``examples/fsdp2_llama.py`` (``fully_shard`` by hand) and ``examples/lightning_fsdp2.py``
(Lightning's ``ModelParallelStrategy``) train the same model on the same text with the same
learning-rate spike, so that their runs compare.
"""

from __future__ import annotations

import argparse

import torch


def add_llama_arguments(parser: argparse.ArgumentParser) -> None:
    """The run's length, its learning rate and spike, the batch and the model's size."""
    parser.add_argument("--steps", type=int, default=30, help="training steps (default 30)")
    parser.add_argument("--spike-at", type=int, default=15, help="first step of the LR spike (default 15)")
    parser.add_argument("--spike", type=float, default=1000.0, help="LR factor of the spike (default 1000)")
    parser.add_argument("--lr", type=float, default=1e-3, help="base AdamW learning rate (default 1e-3)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per rank per step (default 8)")
    parser.add_argument("--seq", type=int, default=64, help="bytes per sequence (default 64)")
    parser.add_argument("--hidden", type=int, default=64, help="hidden size (default 64)")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")


def corpus() -> torch.Tensor:
    """The bytes of ``pydoc_data.topics`` (Python's help texts) as token ids 0–255."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics)).encode("utf-8")
    return torch.frombuffer(bytearray(text), dtype=torch.uint8).long()


def tiny_llama(args: argparse.Namespace) -> torch.nn.Module:
    """An unsharded ``LlamaForCausalLM`` over bytes (vocabulary 256), the same weights on every rank."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=args.seq, attn_implementation="eager",
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)
