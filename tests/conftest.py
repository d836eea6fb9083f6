"""Shared fixtures: a tiny random-weight Llama (milliseconds) and the embedded tokenizer."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub is imported: it reads this once

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, eos_token_id=None, bos_token_id=None, pad_token_id=None)
    model = LlamaForCausalLM(config).eval()
    model.requires_grad_(False)
    return model


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    from medusa_lib.base import checkpoint_path
    return AutoTokenizer.from_pretrained(checkpoint_path("embedded"))


def perturbed(heads, scale: float, seed: int):
    """Heads nudged off their initialisation (neither identity nor useless), reproducibly."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(scale * torch.randn_like(p))
    return heads
