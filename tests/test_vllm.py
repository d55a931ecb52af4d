"""garage.vllm against transformers with the tests' own hooks: greedy tokens, mixed batches, prefix caching.

Runs where vLLM is installed (`.ci/vllm` makes that venv); skipped elsewhere. One engine per fixture.
The references below carry their own formulas and module paths (transformers' Llama: model.layers[i],
.self_attn.o_proj, .mlp, .mlp.down_proj, model.embed_tokens, model.norm) and know nothing of garage.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterator

import pytest
import torch

vllm = pytest.importorskip("vllm")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB: the default sizes the cache to most of the machine

import garage  # noqa: E402
import garage.vllm  # noqa: E402
from garage.models import model_folder  # noqa: E402

pytestmark = pytest.mark.vllm

SPECS = {
    "steer": "at h.2 add v * 4",
    "damp": "at h.1 scale 0.5\nat h.3.attn.heads{1, 3} zero",
    "where": "at h.2[last] add v * 6\nat h.1.mlp[new] scale 1.5\nat h.0[1:3] add v * -3",
    "sites": "at embed add v * 2\nat h.2.mlp.hidden scale 0.3\nat h.3.in scale 1.2\nat h.1.attn[prompt] scale 0.5\n"
             "at final add v * 3",
}
NEW = 12


# ------------------------------------------------------------------ the reference: transformers + own hooks
def _tensor_out(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[..., Any]:
    def hook(module: Any, args: Any, output: Any) -> Any:
        if isinstance(output, tuple):
            return (fn(output[0]), *output[1:])
        return fn(output)
    return hook


def _at(select: Callable[[int, int], slice | None], fn: Callable[[torch.Tensor], torch.Tensor],
        prompt: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Apply fn at the positions `select(seq_len, prompt)` names in this forward ([batch, seq, width])."""
    def apply(h: torch.Tensor) -> torch.Tensor:
        where = select(h.shape[1], prompt)
        if where is None:
            return h
        h = h.clone()
        h[:, where] = fn(h[:, where])
        return h
    return apply


def every(seq: int, prompt: int) -> slice | None:
    return slice(None)


def last(seq: int, prompt: int) -> slice | None:  # the prompt's last token, then each new one
    return slice(-1, None)


def new(seq: int, prompt: int) -> slice | None:
    return None if seq > 1 else slice(None)


def prompt_only(seq: int, prompt: int) -> slice | None:
    return slice(None) if seq > 1 else None


def absolute(a: int, b: int) -> Callable[[int, int], slice | None]:
    return lambda seq, prompt: slice(a, b) if seq > 1 else None  # prompts are longer than b


def reference_hooks(model: Any, name: str | None, v: torch.Tensor, prompt: int) -> list[Any]:
    layers, handles = model.model.layers, []

    def out(module: Any, select: Callable[[int, int], slice | None], fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        handles.append(module.register_forward_hook(_tensor_out(_at(select, fn, prompt))))

    def into(module: Any, select: Callable[[int, int], slice | None], fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        apply = _at(select, fn, prompt)
        handles.append(module.register_forward_pre_hook(lambda m, args: (apply(args[0]), *args[1:])))

    def zero_heads(h: torch.Tensor) -> torch.Tensor:
        h = h.clone()
        size = h.shape[-1] // model.config.num_attention_heads
        for head in (1, 3):
            h[..., head * size:(head + 1) * size] = 0
        return h

    if name == "steer":
        out(layers[2], every, lambda h: h + 4 * v)
    elif name == "steer at -2":  # "steer" after set_value(llm, "steer", 0, "factor", -2.0)
        out(layers[2], every, lambda h: h - 2 * v)
    elif name == "damp":
        out(layers[1], every, lambda h: h * 0.5)
        into(layers[3].self_attn.o_proj, every, zero_heads)
    elif name == "where":
        out(layers[2], last, lambda h: h + 6 * v)
        out(layers[1].mlp, new, lambda h: h * 1.5)
        out(layers[0], absolute(1, 3), lambda h: h - 3 * v)
    elif name == "sites":
        out(model.model.embed_tokens, every, lambda h: h + 2 * v)
        into(layers[2].mlp.down_proj, every, lambda h: h * 0.3)
        into(layers[3], every, lambda h: h * 1.2)
        out(layers[1].self_attn, prompt_only, lambda h: h * 0.5)
        out(model.model.norm, every, lambda h: h + 3 * v)
    return handles


@torch.no_grad()
def reference_tokens(model: Any, ids: list[int], name: str | None, v: torch.Tensor, new_tokens: int = NEW) -> list[int]:
    handles = reference_hooks(model, name, v, len(ids))
    try:
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    finally:
        for h in handles:
            h.remove()
    return out[0, len(ids):].tolist()


# ------------------------------------------------------------------ engines
def hf_model(folder: str) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # vLLM runs with ignore_eos: both make every token
    model.generation_config.pad_token_id = 0
    return model


def engine(folder: str, v: torch.Tensor, **kwargs: Any) -> Any:
    return garage.vllm.LLM(folder, specs=SPECS, bind={"v": v}, dtype="float32", seed=0, **{"max_model_len": 512, **kwargs})


def run(llm: Any, prompts: list[list[int]], names: list[str | None], new_tokens: int = NEW) -> list[Any]:
    from vllm import SamplingParams

    params = [SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True,
                             extra_args={"garage": n} if n else None) for n in names]
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)


def prompts_for(vocab: int, count: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (int(torch.randint(5, 14, (1,), generator=g)),), generator=g).tolist()
            for _ in range(count)]


@pytest.fixture(scope="module")
def tiny() -> Iterator[tuple[str, Any, torch.Tensor]]:
    folder = model_folder("tiny:llama", seed=3)
    yield folder, hf_model(folder), torch.randn(128, generator=torch.Generator().manual_seed(7))


def check_mixed(llm: Any, model: Any, v: torch.Tensor, seed: int) -> None:
    """Every spec and the plain model in one batch, each row against its own reference."""
    names: list[str | None] = [None, *SPECS, "steer", None, "where", "damp"]
    prompts = prompts_for(model.config.vocab_size, len(names), seed)
    outs = run(llm, prompts, names)
    for ids, name, out in zip(prompts, names, outs):
        assert list(out.outputs[0].token_ids) == reference_tokens(model, ids, name, v), name


@pytest.fixture(scope="module")
def eager_engine(tiny: tuple[str, Any, torch.Tensor]) -> Iterator[Any]:
    """An engine under pressure, so that every test on it meets what continuous batching does to positions:
    a step holds at most 32 tokens, so prompts are prefilled in chunks beside other requests' decode tokens;
    and the KV cache holds 8 blocks of 32 tokens (the CPU kernel's smallest block), fewer than a batch needs,
    so vLLM preempts requests and later recomputes them from position 0."""
    folder, _, v = tiny
    yield engine(folder, v, enforce_eager=True, max_num_batched_tokens=32, block_size=32, num_gpu_blocks_override=8,
                 max_model_len=128, disable_log_stats=False)


def preemptions(llm: Any) -> float:
    return sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")


def test_specs_change_tokens(tiny: tuple[str, Any, torch.Tensor]) -> None:
    """The references are not vacuous: each spec changes the greedy tokens of the plain model."""
    folder, model, v = tiny
    ids = prompts_for(model.config.vocab_size, 1, 0)[0]
    plain = reference_tokens(model, ids, None, v)
    for name in SPECS:
        assert reference_tokens(model, ids, name, v) != plain, name


def test_mixed_batch_eager(tiny: tuple[str, Any, torch.Tensor], eager_engine: Any) -> None:
    _, model, v = tiny
    for seed in (1, 2):
        check_mixed(eager_engine, model, v, seed)


def test_long_prompts_in_chunks(tiny: tuple[str, Any, torch.Tensor], eager_engine: Any) -> None:
    """Prompts of 70 and 45 tokens take several steps of 32, beside requests that already decode."""
    _, model, v = tiny
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist() for n in (70, 9, 45, 6)]
    names: list[str | None] = ["where", "steer", None, "sites"]
    for ids, name, out in zip(prompts, names, run(eager_engine, prompts, names)):
        assert list(out.outputs[0].token_ids) == reference_tokens(model, ids, name, v), name


def test_prefix_cache_is_not_shared_across_specs(tiny: tuple[str, Any, torch.Tensor], eager_engine: Any) -> None:
    """A steered request's KV blocks are never reused by the plain model or another spec, and are reused by
    the same spec."""
    _, model, v = tiny
    block = eager_engine.llm_engine.vllm_config.cache_config.block_size
    ids = torch.randint(0, model.config.vocab_size, (block + 20,), generator=torch.Generator().manual_seed(11)).tolist()
    steered = run(eager_engine, [ids], ["steer"])[0]
    plain = run(eager_engine, [ids], [None])[0]
    other = run(eager_engine, [ids], ["damp"])[0]
    again = run(eager_engine, [ids], ["steer"])[0]
    assert plain.num_cached_tokens == 0 and other.num_cached_tokens == 0
    assert again.num_cached_tokens >= block
    for out, name in ((steered, "steer"), (plain, None), (other, "damp"), (again, "steer")):
        assert list(out.outputs[0].token_ids) == reference_tokens(model, ids, name, v), name


def test_a_longer_prompt_does_not_reuse_blocks_whose_new_tokens_are_its_prompt(
        tiny: tuple[str, Any, torch.Tensor], eager_engine: Any) -> None:
    """Multi-turn chat: the next prompt is the last prompt plus its reply. Under `[new]`/`[last]` the cached
    blocks of the reply were computed as new tokens, which are prompt tokens now: they must not be reused."""
    _, model, v = tiny
    block = eager_engine.llm_engine.vllm_config.cache_config.block_size
    first = torch.randint(0, model.config.vocab_size, (block,), generator=torch.Generator().manual_seed(14)).tolist()
    reply = run(eager_engine, [first], ["where"], new_tokens=block + 8)[0]
    second = first + list(reply.outputs[0].token_ids)
    out = run(eager_engine, [second], ["where"])[0]
    assert out.num_cached_tokens == 0
    assert list(out.outputs[0].token_ids) == reference_tokens(model, second, "where", v)
    again = run(eager_engine, [second], ["where"])[0]  # the same prompt length shares blocks as before
    assert again.num_cached_tokens >= block
    assert list(again.outputs[0].token_ids) == list(out.outputs[0].token_ids)


def test_preempted_requests_resume_with_their_positions(tiny: tuple[str, Any, torch.Tensor], eager_engine: Any) -> None:
    """Recomputed after preemption, a request keeps its absolute positions and its prompt length, so `[new]`,
    `[last]` and `[1:3]` still name the same tokens."""
    _, model, v = tiny
    names: list[str | None] = ["where", "steer", "where", None, "sites", "where"]
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(0, model.config.vocab_size, (20,), generator=g).tolist() for _ in names]
    before = preemptions(eager_engine)
    outs = run(eager_engine, prompts, names, new_tokens=24)
    assert preemptions(eager_engine) > before, "the test needs a cache small enough to preempt"
    for ids, name, out in zip(prompts, names, outs):
        assert list(out.outputs[0].token_ids) == reference_tokens(model, ids, name, v, 24), name


def check_set_value(llm: Any, model: Any, v: torch.Tensor) -> None:
    """A strength changed in the running engine: the next request uses it, and the prefix cache does not
    hand back blocks computed with the old one."""
    ids = prompts_for(model.config.vocab_size, 1, 12)[0] * 4
    before = run(llm, [ids], ["steer"])[0]
    garage.vllm.set_value(llm, "steer", 0, "factor", -2.0)
    try:
        after = run(llm, [ids], ["steer"])[0]
        assert after.num_cached_tokens == 0
        assert list(after.outputs[0].token_ids) == reference_tokens(model, ids, "steer at -2", v)
        assert list(before.outputs[0].token_ids) == reference_tokens(model, ids, "steer", v)
    finally:
        garage.vllm.set_value(llm, "steer", 0, "factor", 4.0)
    with pytest.raises(Exception, match="whose values are vector, factor"):
        garage.vllm.set_value(llm, "steer", 0, "strength", 1.0)


def test_set_value_changes_a_strength_without_a_restart(tiny: tuple[str, Any, torch.Tensor], eager_engine: Any) -> None:
    _, model, v = tiny
    check_set_value(eager_engine, model, v)


def test_unknown_spec_is_refused_with_the_names(eager_engine: Any) -> None:
    with pytest.raises(ValueError, match="unknown garage spec 'nope': this engine serves damp, sites, steer, where"):
        run(eager_engine, [[1, 2, 3]], ["nope"])
    assert eager_engine.collective_rpc("garage_specs") == [list(SPECS)]


def test_backend_protocol_generates_as_garage_does(tiny: tuple[str, Any, torch.Tensor], eager_engine: Any) -> None:
    """VllmBackend takes and returns what garage's own backends do: a left-padded batch in, prompt + new ids
    out. It equals InjectedModel.generate (transformers, garage's graph backend) on the same spec."""
    from garage.runtime.sampling import Generation
    from garage.vllm import VllmBackend

    folder, model, v = tiny
    rows = prompts_for(model.config.vocab_size, 3, 8)
    width = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    request = Generation.resolve(model.generation_config, max_new_tokens=NEW)
    got = VllmBackend(eager_engine, "where").generate(ids, mask, request)
    want = garage.compile(model, SPECS["where"], bind={"v": v}).generate(ids, attention_mask=mask, max_new_tokens=NEW)
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="not logits"):
        VllmBackend(eager_engine).score({"input_ids": ids})


def test_mixed_batch_compiled_tiny(tiny: tuple[str, Any, torch.Tensor]) -> None:
    """vLLM's own torch.compile (the default): the ops are inside its graph, and tables are read live."""
    folder, model, v = tiny
    llm = engine(folder, v)
    assert llm.llm_engine.vllm_config.compilation_config.mode != 0
    check_mixed(llm, model, v, 3)
    check_set_value(llm, model, v)  # the compiled graph reads the buffer live: no recompile, no restart
    del llm


def smollm2() -> tuple[str, Any, torch.Tensor]:
    """The real model: 30 layers, hidden 576 (so v is drawn at that width)."""
    folder = model_folder("smollm2")
    return folder, hf_model(folder), torch.randn(576, generator=torch.Generator().manual_seed(9)) * 0.5


@pytest.mark.slow
def test_smollm2_compiled() -> None:
    """(Slow, about 2 minutes: `.ci/vllm all` runs it; CI compiles the same specs on the tiny model.)"""
    folder, model, v = smollm2()
    llm = engine(folder, v)
    assert llm.llm_engine.vllm_config.compilation_config.mode != 0
    check_mixed(llm, model, v, 4)
    del llm


@pytest.mark.slow
def test_smollm2_eager() -> None:
    """(Slow: `.ci/vllm all` runs it; CI leaves eager mode to the tiny model's tests.)"""
    folder, model, v = smollm2()
    llm = engine(folder, v, enforce_eager=True)
    check_mixed(llm, model, v, 4)
    del llm


def saved_family(model_type: str, folder: Any) -> str:
    """A tiny random model of a served family, saved with garage's character tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from garage.models import char_tokenizer

    config = AutoConfig.for_model(model_type, num_hidden_layers=4, hidden_size=128, intermediate_size=256,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=100,
                                  max_position_embeddings=512, initializer_range=0.3, tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return str(folder)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["mistral", "qwen2", "qwen3"])
def test_other_served_families(model_type: str, tmp_path: Any) -> None:
    """(Slow: one engine each; .ci/vllm leaves them to `.ci/vllm all`.)"""
    folder = saved_family(model_type, tmp_path)
    model = hf_model(folder)
    v = torch.randn(128, generator=torch.Generator().manual_seed(2))
    llm = engine(folder, v, enforce_eager=True)
    check_mixed(llm, model, v, 5)
    del llm


class _FirstLinear(torch.overrides.TorchFunctionMode):
    """Applies fn to the first F.linear result computed inside a router's call: its logits (the test's own
    way to reach them, since transformers' router also runs softmax and top-k in the same call)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn, self.done = fn, False

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func is torch.nn.functional.linear and not self.done:
            self.done = True
            return self.fn(out)
        return out


def router_hooks(gate: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> list[Any]:
    modes: list[_FirstLinear] = []

    def enter(module: Any, args: Any) -> None:
        modes.append(_FirstLinear(fn))
        modes[-1].__enter__()

    def leave(module: Any, args: Any, output: Any) -> None:
        modes.pop().__exit__(None, None, None)

    return [gate.register_forward_pre_hook(enter), gate.register_forward_hook(leave)]


MOE_SPECS = {
    "route": "at h.1.router bias {1, 5} * 6",
    "mask": "at h.2.router mask {0, 3}\nat h.0.mlp scale 0.5",
    "force": "at h.3.router[new] force 2",
}


def moe_reference(model: Any, ids: list[int], name: str | None) -> list[int]:
    layers, handles = model.model.layers, []
    lowest = torch.finfo(torch.float32).min

    def masked(logits: torch.Tensor, experts: list[int]) -> torch.Tensor:
        logits = logits.clone()
        logits[:, experts] = lowest
        return logits

    if name == "route":
        profile = torch.zeros(8)
        profile[[1, 5]] = 6.0
        handles += router_hooks(layers[1].mlp.gate, lambda logits: logits + profile)
    elif name == "mask":
        handles += router_hooks(layers[2].mlp.gate, lambda logits: masked(logits, [0, 3]))
        handles.append(layers[0].mlp.register_forward_hook(_tensor_out(lambda h: h * 0.5)))
    elif name == "force":  # generated tokens only: a decode step routes one token
        handles += router_hooks(layers[3].mlp.gate, lambda logits: logits if logits.shape[0] > 1 else
                                masked(logits, [e for e in range(8) if e != 2]))
    try:
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    finally:
        for h in handles:
            h.remove()
    return out[0, len(ids):].tolist()


def test_mixtral_router_ops(tmp_path: Any) -> None:
    """vLLM's Mixtral routes by its gate's logits (`block_sparse_moe.gate`, transformers' `mlp.gate`): bias,
    mask and force there, and scale at the MoE block's output, in one mixed batch."""
    folder = model_folder("tiny:mixtral", seed=1)
    model = hf_model(folder)
    llm = garage.vllm.LLM(folder, specs=MOE_SPECS, dtype="float32", seed=0, enforce_eager=True, max_model_len=256)
    names: list[str | None] = [None, "route", "mask", "force", "route", None]
    prompts = prompts_for(model.config.vocab_size, len(names), 13)
    plain = moe_reference(model, prompts[0], None)
    assert all(moe_reference(model, prompts[0], n) != plain for n in MOE_SPECS)  # each spec changes tokens
    for ids, name, out in zip(prompts, names, run(llm, prompts, names)):
        assert list(out.outputs[0].token_ids) == moe_reference(model, ids, name), name
    del llm


def _post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    import json
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_garage_serve_answers_with_the_spec_applied(tiny: tuple[str, Any, torch.Tensor], tmp_path: Any) -> None:
    """`garage serve` is vLLM's OpenAI server: one completion with the spec, one without, one refused."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    folder, model, _ = tiny
    (tmp_path / "damp.garage").write_text("# served\nat h.1 scale 0.5\nat h.3.attn.heads{1, 3} zero\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "garage", "serve", "--model", folder, "--spec",
                               f"damp={tmp_path / 'damp.garage'}", "--port", str(port), "--host", "127.0.0.1",
                               "--dtype", "float32", "--enforce-eager", "--max-model-len", "512", "--seed", "0"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert server.poll() is None, server.stderr.read().decode()[-3000:] if server.stderr else ""
            try:
                urllib.request.urlopen(base + "/health", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "the server did not start in 240 s"
                time.sleep(1)
        ids = prompts_for(model.config.vocab_size, 1, 21)[0]
        body = {"model": folder, "prompt": ids, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
                "return_token_ids": True}
        for name in ("damp", None):
            status, answer = _post(base + "/v1/completions", {**body, **({"vllm_xargs": {"garage": name}} if name else {})})
            assert status == 200, answer
            assert answer["choices"][0]["token_ids"] == reference_tokens(model, ids, name, torch.zeros(1), 8), name
        status, answer = _post(base + "/v1/completions", {**body, "vllm_xargs": {"garage": "steer"}})
        assert status == 400 and "unknown garage spec 'steer': this engine serves damp" in json_text(answer)
    finally:
        server.terminate()
        server.wait(timeout=60)


def json_text(answer: dict[str, Any]) -> str:
    import json

    return json.dumps(answer)
