import os

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

# Under pytest-xdist (`-n 2`, the README's command) each worker gets its share of the cores: OpenMP threads
# beyond them spin against the other workers' and make compiled CPU kernels many times slower.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


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
    """Tests never read or write the user's garage cache: each session (each xdist worker) gets an empty one."""
    old = os.environ.get("GARAGE_CACHE")
    os.environ["GARAGE_CACHE"] = str(tmp_path_factory.mktemp("garage-cache"))
    yield
    if old is None:
        os.environ.pop("GARAGE_CACHE", None)
    else:
        os.environ["GARAGE_CACHE"] = old
