"""`patch from source`: each spelling against a two-run reference written here.

The reference runs the eager model twice with this file's own forward hooks, at module paths from this
file's own table: once on the source input, keeping the site's value, then on the base input, putting the
source's values in at token pairs this file computes with its own loops over the attention masks.
Nothing here uses garage's ops, resolver or hooks to compute an expected value.
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch
from torch import nn
from test_heads_and_routers import FirstLinear
from zoo import tiny_model

import garage

Pairs = list[list[tuple[int, int]]]  # per base row: (base column, source column) pairs to patch
HEADS = 4

# By hand, per family: the block list, then inside a block: attention, MLP, attention's output projection,
# the MLP's down projection; and the final norm.
TABLE = {
    "gpt2": ("transformer.h", "attn", "mlp", "attn.c_proj", "mlp.c_proj", "transformer.ln_f"),
    "llama": ("model.layers", "self_attn", "mlp", "self_attn.o_proj", "mlp.down_proj", "model.norm"),
    "qwen2": ("model.layers", "self_attn", "mlp", "self_attn.o_proj", "mlp.down_proj", "model.norm"),
    "mixtral": ("model.layers", "self_attn", "mlp", "self_attn.o_proj", None, "model.norm"),
}


def module(model: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        model = getattr(model, part)
    return model


def where(name: str, site: str) -> tuple[str, str]:
    """(module path, "out" | "in" | "router") of a site, from the table."""
    blocks, attn, mlp, heads, hidden, final = TABLE[name]
    if site == "final":
        return final, "out"
    if site == "embed":
        return f"{blocks}.0", "in"
    layer, _, part = site.removeprefix("h.").partition(".")
    block = f"{blocks}.{layer}"
    return {"": (block, "out"), "in": (block, "in"), "attn": (f"{block}.{attn}", "out"),
            "mlp": (f"{block}.{mlp}", "out"), "attn.heads{1, 3}": (f"{block}.{heads}", "in"),
            "mlp.hidden": (f"{block}.{hidden}", "in"), "router": (f"{block}.mlp.gate", "router")}[part]


Edit = tuple[str, str, Callable[[torch.Tensor], torch.Tensor]]  # (module path, "out" | "in" | "router", fn)


def hooked(target: nn.Module, how: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> list:
    """Hooks that apply `fn` to the module's output, its input, or its first linear result."""
    if how == "out":
        return [target.register_forward_hook(
            lambda _m, _a, out: (fn(out[0]), *out[1:]) if isinstance(out, tuple) else fn(out))]
    if how == "in":
        return [target.register_forward_pre_hook(
            lambda _m, args, kwargs: ((fn(args[0]), *args[1:]), kwargs) if args
            else (args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}), with_kwargs=True)]
    modes: list[FirstLinear] = []

    def enter(*_: object) -> None:
        modes.append(FirstLinear(fn))
        modes[-1].__enter__()
    return [target.register_forward_pre_hook(enter),
            target.register_forward_hook(lambda *_: modes.pop().__exit__(None, None, None))]


def run(model: nn.Module, inputs: dict[str, torch.Tensor], *edits: Edit) -> torch.Tensor:
    """Logits with each edit's fn applied at its module."""
    handles = [h for path, how, fn in edits for h in hooked(module(model, path), how, fn)]
    try:
        with torch.no_grad():
            return model(**inputs).logits
    finally:
        for handle in handles:
            handle.remove()


def real_columns(mask: torch.Tensor) -> list[list[int]]:
    return [[c for c in range(mask.shape[1]) if mask[r, c]] for r in range(mask.shape[0])]


def pairs(base_mask: torch.Tensor, source_mask: torch.Tensor, positions: str) -> Pairs:
    """Which base token takes which source token: by position from each row's first real token; [last] pairs
    the last real tokens."""
    base, source = real_columns(base_mask), real_columns(source_mask)
    if len(source) == 1:
        source = source * len(base)
    out: Pairs = []
    for b, s in zip(base, source):
        if positions == "[last]":
            out.append([(b[-1], s[-1])])
            continue
        keep = {"": lambda p: True, "[prompt]": lambda p: True, "[2]": lambda p: p == 2,
                "[1:4]": lambda p: 1 <= p < 4, "[3:]": lambda p: p >= 3}[positions]
        out.append([(b[p], s[p]) for p in range(min(len(b), len(s))) if keep(p)])
    return out


def putter(model: nn.Module, base: dict[str, torch.Tensor], source: dict[str, torch.Tensor], path: str, how: str,
           positions: str, mix: float = 1.0, chosen: list[int] | None = None) -> Edit:
    """The two-run reference's edit: the source's value at the module (kept by a plain run on the source),
    put into the base run at the paired tokens (at the chosen heads only, when given)."""
    kept: list[torch.Tensor] = []
    run(model, source, (path, how, lambda h: kept.append(h.detach().clone()) or h))
    todo = pairs(base["attention_mask"], source["attention_mask"], positions)
    rows, seq = base["input_ids"].shape
    src_rows, src_seq = source["input_ids"].shape

    def put(h: torch.Tensor) -> torch.Tensor:
        out = h.reshape(rows, seq, -1).clone()
        s = kept[0].reshape(src_rows, src_seq, -1)
        for r, row_pairs in enumerate(todo):
            for bc, sc in row_pairs:
                new = s[r if src_rows > 1 else 0, sc]
                if chosen is None:
                    out[r, bc] = out[r, bc] + mix * (new - out[r, bc])
                else:
                    o, n = out[r, bc].reshape(HEADS, -1), new.reshape(HEADS, -1)
                    o[chosen] = o[chosen] + mix * (n[chosen] - o[chosen])
        return out.reshape(h.shape)
    return path, how, put


def patched(model: nn.Module, base: dict[str, torch.Tensor], source: dict[str, torch.Tensor], site: str,
            positions: str, mix: float = 1.0, name: str = "") -> torch.Tensor:
    """The two-run reference at a site of the table."""
    path, how = where(name, site)
    return run(model, base, putter(model, base, source, path, how, positions, mix, [1, 3] if "heads" in site else None))


def inputs(seed: int, rows: int, seq: int, pads: list[int]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (rows, seq), generator=g)
    mask = torch.ones_like(ids)
    for r, pad in enumerate(pads):
        mask[r, :pad] = 0
    return {"input_ids": ids, "attention_mask": mask}


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(((a - b).abs().max() / b.abs().max().clamp_min(1e-6)) <= 1e-5)


SITES = ["h.1", "h.2.in", "h.1.attn", "h.2.mlp", "h.1.mlp.hidden", "h.2.attn.heads{1, 3}", "embed", "final", "h.1.router"]
FAMILIES = {name: tiny_model(name) for name in TABLE}


def sites_of(name: str) -> list[str]:
    if name == "mixtral":
        return [s for s in SITES if "mlp.hidden" not in s]
    return [s for s in SITES if "router" not in s]


@pytest.mark.parametrize("positions", ["", "[last]", "[2]", "[1:4]"])
@pytest.mark.parametrize("name", list(TABLE))
def test_each_site_and_position_matches_the_two_run_reference(name, positions):
    model = FAMILIES[name]
    base, source = inputs(1, 2, 9, [3, 0]), inputs(2, 2, 6, [0, 2])  # different lengths, left padding
    for site in sites_of(name):
        inj = garage.compile(model, f"at {site}{positions} patch from source")
        with torch.no_grad():
            got = inj(**base, source=source).logits
        want = patched(model, base, source, site, positions, name=name)
        assert close(got, want), (site, positions, (got - want).abs().max())
        assert not torch.equal(want, run(model, base, (*where(name, site), lambda h: h))), (site, positions)


@pytest.mark.parametrize("seed", [0, 1])
def test_mix_interpolates_and_one_source_row_serves_every_base_row(seed):
    model = FAMILIES["llama"]
    base, source = inputs(seed, 3, 8, [2, 0, 4]), inputs(seed + 10, 1, 10, [1])
    for spec, mix in (("at h.2[3:] patch from source mix 0.25", 0.25), ("at h.2[3:] patch from source", 1.0)):
        with torch.no_grad():
            got = garage.compile(model, spec)(**base, source=source).logits
        assert close(got, patched(model, base, source, "h.2", "[3:]", mix, name="llama"))


def test_patching_from_the_same_input_or_with_mix_0_is_the_plain_model():
    model = FAMILIES["gpt2"]
    base = inputs(5, 2, 7, [2, 0])
    with torch.no_grad():
        plain = model(**base).logits
        same = garage.compile(model, "at h.*.attn patch from source; at h.2[last] patch from source")(**base, source=base)
        none = garage.compile(model, "at h.1 patch from source mix 0")(**base, source=inputs(6, 2, 5, [0, 1]))
    assert torch.equal(same.logits, plain) and torch.equal(none.logits, plain)


def test_stacked_patches_at_several_layers_read_one_source_run():
    model = FAMILIES["qwen2"]
    base, source = inputs(3, 2, 8, [0, 3]), inputs(4, 2, 8, [2, 0])
    inj = garage.compile(model, "at h.0[last] patch from source\nat h.2.mlp[1:4] patch from source mix 0.5")
    # the source's MLP value at block 2 is the unpatched source's; the base run has block 0 patched first
    want = run(model, base, putter(model, base, source, "model.layers.0", "out", "[last]"),
               putter(model, base, source, "model.layers.2.mlp", "out", "[1:4]", 0.5))
    with torch.no_grad():
        assert close(inj(**base, source=source).logits, want)


def test_the_source_runs_only_the_blocks_the_patches_need():
    model = FAMILIES["llama"]
    gm = garage.compile(model, "at h.1.attn[last] patch from source").graph_module
    reads = [str(n.target) for n in gm.graph.nodes if n.op == "get_attr"]
    per_block = [sum(t.startswith(f"model.layers.{i}.") for t in reads) for i in range(4)]
    params = sum(1 for _ in module(model, "model.layers.0").parameters())
    # block 0 twice; of block 1 the source runs only what its attention output needs (its norm, q, k, v, o)
    assert per_block == [2 * params, params + 5, params, params]
    assert sum(t == "lm_head.weight" for t in reads) == 1


def test_bad_calls_are_diagnostics_at_the_patch_statement():
    model = FAMILIES["gpt2"]
    inj = garage.compile(model, "at h.1 scale 0.9\nat h.2[last] patch from source")
    base = inputs(0, 2, 6, [0, 0])
    with pytest.raises(garage.GarageError) as err:
        inj(**base)
    assert err.value.diagnostics[0].line == 2 and "gave none" in str(err.value) and "source=" in str(err.value)
    with pytest.raises(garage.GarageError, match="3 rows and the base input 2"):
        inj(**base, source=inputs(1, 3, 6, [0, 0, 0]))
    with pytest.raises(garage.GarageError, match="must map input names to tensors"):
        inj(**base, source=base["input_ids"])
    with pytest.raises(garage.GarageError, match="lacks token_type_ids"):
        inj(**base, token_type_ids=torch.zeros_like(base["input_ids"]), source=base)
    with pytest.raises(garage.GarageError, match="not in generation"):
        inj.generate(base["input_ids"], max_new_tokens=2)
    with pytest.raises(garage.GarageError, match="a saved program takes input_ids"):
        inj.save("never.pt2")
    with pytest.raises(garage.GarageError, match="garage.compile only"):
        garage.hook(model, "at h.2 patch from source")
    with pytest.raises(TypeError, match="specs that patch"):
        garage.compile(model, "at h.1 scale 0.9")(**base, source=base)
    (error,) = garage.check(model, "at h.1[new] patch from source").errors
    assert "no generated tokens" in error.message and error.column == 13
    with pytest.raises(garage.SpecError, match=r"mix must lie in \[0, 1\]"):
        garage.parse("at h.1 patch from source mix 1.5")
    spec = garage.parse("at h.3.attn.heads{5, 1}[last] patch from source mix 0.5")
    assert garage.format(spec) == "at h.3.attn.heads{1, 5}[last] patch from source mix 0.5\n"


@pytest.mark.slow
def test_a_patching_graph_compiles_whole_with_fullgraph():
    model = FAMILIES["gpt2"]
    spec = "at h.1[last] patch from source; at h.2.attn.heads{0} patch from source mix 0.5"
    base, source = inputs(7, 2, 8, [2, 0]), inputs(8, 2, 5, [0, 1])
    with torch.no_grad():
        want = garage.compile(model, spec)(**base, source=source).logits
        got = garage.compile(model, spec, compile={"fullgraph": True})(**base, source=source).logits
    assert close(got, want)


def test_a_module_path_is_patched_and_explain_says_what_the_source_runs():
    model = FAMILIES["gpt2"]
    base, source = inputs(9, 2, 7, [1, 0]), inputs(10, 2, 7, [0, 2])
    inj = garage.compile(model, 'at "transformer.h.1.mlp.c_fc"[last] patch from source')
    want = run(model, base, putter(model, base, source, "transformer.h.1.mlp.c_fc", "out", "[last]"))
    with torch.no_grad():
        assert close(inj(**base, source=source).logits, want)
    assert "1 patch site(s) read one source run of blocks 0..1 of 4" in inj.explain()
