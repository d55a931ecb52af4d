"""Captures during generation (`capture` in docs/language.md): every forward call's values, joined along the
sequence, on the graph backend and on the hook fallback.

The references are the test's own forward hooks on the eager model while `model.generate` runs with the same
greedy settings: one recorded value per call (the prompt, then each token fed back), joined here by hand.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn
from zoo import tiny_model

import garage
from garage.lang.diagnostics import Diagnostic

NEW = 6
BACKENDS = ("graph", "hooks")
BLOCK: dict[str, Callable[[nn.Module], nn.Module]] = {
    "gpt2": lambda m: m.transformer.h[2],
    "llama": lambda m: m.model.layers[2],
}
ATTN_OUT: dict[str, Callable[[nn.Module], nn.Module]] = {  # the input of these is h.2.attn.heads
    "gpt2": lambda m: m.transformer.h[2].attn.c_proj,
    "llama": lambda m: m.model.layers[2].self_attn.o_proj,
}


def never_stopping(name: str) -> nn.Module:
    model = tiny_model(name)
    model.generation_config.eos_token_id = None  # NEW tokens in every row, unless a test names an EOS
    model.generation_config.pad_token_id = 0
    return model


def prompt(seed: int, batch: int = 3, seq: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids, left-padded: row 0 by a seed-dependent amount, row 1 by one token, the rest not."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, : 2 + seed % 4] = 0
    mask[1, :1] = 0
    return ids, mask


def first(value: object) -> torch.Tensor:
    """The hidden state in a module's output or its positional inputs."""
    return (value[0] if isinstance(value, (tuple, list)) else value).detach()  # type: ignore[return-value]


def reference(model: nn.Module, module: nn.Module, ids: torch.Tensor, mask: torch.Tensor, *, inputs: bool = False,
              **options) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """`model.generate`'s tokens, and `module`'s output (or input) at each of the model's forward calls."""
    calls: list[torch.Tensor] = []
    if inputs:
        handle = module.register_forward_pre_hook(lambda _m, args: calls.append(first(args)))
    else:
        handle = module.register_forward_hook(lambda _m, _args, out: calls.append(first(out)))
    try:
        with torch.no_grad():
            tokens = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, **options)
    finally:
        handle.remove()
    return tokens, calls


def compiled(model: nn.Module, spec: str, backend: str,
             monkeypatch: pytest.MonkeyPatch) -> tuple[garage.InjectedModel, list[int]]:
    """The spec compiled on `model`; with "hooks", generation runs on the hook fallback (the list counts its runs)."""
    inj = garage.compile(model, spec)
    runs: list[int] = []
    if backend == "hooks":
        inj.backend.fallbacks["generation"] = Diagnostic("warning", "this test generates by hooks", rule="test")
        inj.backend._hooked.add("generation")  # the use, as when a graph's guards refuse an input
        hooks_generate = inj.backend.hooks.generate
        monkeypatch.setattr(inj.backend.hooks, "generate", lambda *args: runs.append(1) or hooks_generate(*args))
    return inj, runs


def close(got: torch.Tensor, want: torch.Tensor) -> bool:
    return got.shape == want.shape and torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(BLOCK))
def test_captures_keep_every_step_of_generation(name, backend, seed, monkeypatch):
    model = never_stopping(name)
    ids, mask = prompt(seed)
    spec = "at h.2 capture all; at h.2[new] capture new; at h.2[last] capture last; at h.2[prompt] capture prompt"
    inj, runs = compiled(model, spec, backend, monkeypatch)
    tokens = inj.generate(ids, attention_mask=mask, max_new_tokens=NEW)
    want_tokens, calls = reference(model, BLOCK[name](model), ids, mask)
    assert torch.equal(tokens, want_tokens) and len(runs) == (backend == "hooks")
    assert len(calls) == NEW  # the prompt, then every new token but the last: it is never fed
    got = inj.captures
    assert close(got["all"], torch.cat(calls, dim=1))  # padding columns too: rows line up with `tokens`
    assert got["all"].shape[1] == tokens.shape[1] - 1
    assert close(got["new"], torch.cat(calls[1:], dim=1))
    assert got["new"].shape == (3, NEW - 1, 64)
    assert close(got["last"], torch.cat([calls[0][:, -1:], *calls[1:]], dim=1))  # the state each new token came from
    real = mask[..., None].bool()  # [prompt] on the graph path also selects the (unused) padding's states
    assert close(got["prompt"].where(real, 0), calls[0].where(real, 0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(ATTN_OUT))
def test_heads_captured_at_new_keep_each_generated_token(name, backend, monkeypatch):
    model = never_stopping(name)
    ids, mask = prompt(3)
    inj, _ = compiled(model, "at h.2.attn.heads{0, 2}[new] capture heads", backend, monkeypatch)
    inj.generate(ids, attention_mask=mask, max_new_tokens=NEW)
    _, calls = reference(model, ATTN_OUT[name](model), ids, mask, inputs=True)
    want = torch.cat(calls[1:], dim=1).unflatten(-1, (4, 16))[:, :, [0, 2]]
    assert want.shape == (3, NEW - 1, 2, 16)
    assert close(inj.captures["heads"], want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("name", "site", "module"), [
    ("opt", "h.1.mlp", lambda m: m.model.decoder.layers[1].fc2),  # OPT's MLP works on [batch*seq, hidden]
    ("mixtral", "h.1.router", lambda m: m.model.layers[1].mlp.gate),  # router logits: [batch*seq, experts]
])
def test_flattened_values_are_joined_per_row(name, site, module, backend, monkeypatch):
    model = never_stopping(name)
    ids, mask = prompt(4)
    inj, _ = compiled(model, f"at {site} capture flat; at {site}[new] capture new", backend, monkeypatch)
    inj.generate(ids, attention_mask=mask, max_new_tokens=NEW)
    _, calls = reference(model, module(model), ids, mask)
    per_row = [call.reshape(3, -1, call.shape[-1]) for call in calls]
    assert close(inj.captures["flat"], torch.cat(per_row, dim=1))
    assert close(inj.captures["new"], torch.cat(per_row[1:], dim=1))
    assert inj.captures["new"].shape[:2] == (3, NEW - 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_that_stop_early_keep_their_place(backend, monkeypatch):
    model = never_stopping("llama")
    ids, mask = prompt(5)
    free = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    eos = int(free[0, ids.shape[1] + 1])  # row 0 stops after its second new token; the others may go on
    assert not bool((free[1:, ids.shape[1]:] == eos).any(-1).all()), "pick a prompt where some row goes on"
    inj, _ = compiled(model, "at h.2 capture all; at h.2[new] capture new", backend, monkeypatch)
    tokens = inj.generate(ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=0)
    want_tokens, calls = reference(model, BLOCK["llama"](model), ids, mask, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(tokens, want_tokens) and bool((tokens[0, ids.shape[1] + 2:] == 0).all())  # row 0 is padded
    assert close(inj.captures["all"], torch.cat(calls, dim=1))  # a finished row's fed pad tokens included
    assert inj.captures["all"].shape[1] == tokens.shape[1] - 1
    assert close(inj.captures["new"], torch.cat(calls[1:], dim=1))


def test_a_plain_call_after_generation_replaces_the_captures(monkeypatch):
    model = never_stopping("gpt2")
    ids, mask = prompt(6)
    inj, _ = compiled(model, "at h.2 capture all; at h.2[new] capture new", "graph", monkeypatch)
    inj.generate(ids, attention_mask=mask, max_new_tokens=NEW)
    assert inj.captures["all"].shape == (3, 9 + NEW - 1, 64)
    calls: list[torch.Tensor] = []
    handle = BLOCK["gpt2"](model).register_forward_hook(lambda _m, _args, out: calls.append(first(out)))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
        inj(input_ids=ids, attention_mask=mask)
    handle.remove()
    assert close(inj.captures["all"], calls[0])  # this call's values only
    assert torch.equal(inj.captures["new"], torch.zeros(3, 9, 64))  # a plain call has no new tokens
    inj.generate(ids[:, 2:], attention_mask=mask[:, 2:], max_new_tokens=2)  # a new generation starts afresh
    assert inj.captures["all"].shape == (3, 7 + 1, 64) and inj.captures["new"].shape == (3, 1, 64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_new_token_feeds_nothing_back(backend, monkeypatch):
    model = never_stopping("gpt2")
    ids, mask = prompt(7)
    inj, _ = compiled(model, "at h.2 capture all; at h.2[new] capture new; at h.2[last] capture last", backend,
                      monkeypatch)
    inj.generate(ids, attention_mask=mask, max_new_tokens=1)
    assert inj.captures["all"].shape == (3, 9, 64)
    assert inj.captures["new"].shape == (3, 0, 64)
    assert torch.equal(inj.captures["last"], inj.captures["all"][:, -1:])


@pytest.mark.slow
def test_compiled_generation_records_every_step_without_recompiling():
    """Values are taken out between steps, outside the graph: the step graph compiles once for the prompt
    and once for a token (fullgraph), as without captures."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = never_stopping("llama")
    ids, mask = prompt(8)
    spec = "at h.1 scale 1.5; at h.2 capture all; at h.2[new] capture new; at h.1.attn.heads{1}[last] capture head"
    fast, eager = garage.compile(model, spec, compile={"backend": "eager"}), garage.compile(model, spec)
    assert torch.equal(fast.generate(ids, attention_mask=mask, max_new_tokens=12),
                       eager.generate(ids, attention_mask=mask, max_new_tokens=12))
    assert counters["stats"]["unique_graphs"] == 2
    assert fast.captures["new"].shape == (3, 11, 64) and fast.captures["head"].shape == (3, 12, 1, 16)
    for key, value in eager.captures.items():
        assert close(fast.captures[key], value), key
