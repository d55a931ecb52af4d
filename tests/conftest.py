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


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Tests never read or write the user's garage cache: each session gets an empty one."""
    import os

    old = os.environ.get("GARAGE_CACHE")
    os.environ["GARAGE_CACHE"] = str(tmp_path_factory.mktemp("garage-cache"))
    yield
    if old is None:
        os.environ.pop("GARAGE_CACHE", None)
    else:
        os.environ["GARAGE_CACHE"] = old
