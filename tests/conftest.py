import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel


def tiny_gpt2(n_layer: int = 12, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=n_layer, n_embd=32, n_head=4, vocab_size=64, n_positions=64,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="session")
def gpt2_12() -> GPT2LMHeadModel:
    return tiny_gpt2(12)


@pytest.fixture(scope="session")
def gpt2_32() -> GPT2LMHeadModel:
    return tiny_gpt2(32)
