"""garage.vllm without vLLM: start-up checks, the plan files, per-token tables, the block hooks' arithmetic.

The engine itself is tested in tests/test_vllm.py (vLLM's venv). Everything here runs in the main venv:
it is what decides, before vLLM starts and at each step, which token gets which op.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from transformers import GPT2Config, LlamaConfig

import garage.vllm
from garage.lang.diagnostics import GarageError
from garage.vllm import engine_args, plugin
from garage.vllm.plan import BIND_FILE, PLAN_FILE, build_plan, read_plan
from garage.vllm.worker import (
    HOOKS,
    SiteOps,
    TokenTable,
    fill_tokens,
    selected,
    set_value,
)

CONFIG = LlamaConfig(num_hidden_layers=4, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=100)


def test_bad_spec_stops_start_up_with_file_line_column(tmp_path: Path) -> None:
    """garage.vllm.LLM checks before it imports vLLM: this runs where vLLM is not even installed."""
    spec = tmp_path / "steer.garage"
    spec.write_text("at h.2 scale 0.5\nat h.9 add v\n")
    with pytest.raises(GarageError) as err:
        garage.vllm.LLM("tiny:llama", specs={"steer": spec})
    text = str(err.value)
    assert f"{spec}:2:6" in text and "layer 9 is out of range"  in text and "Traceback" not in text


def test_every_spec_is_checked_and_all_problems_reported_at_once(tmp_path: Path) -> None:
    with pytest.raises(GarageError) as err:
        build_plan(CONFIG, {"a": "at h.1 scale", "b": "at h.2 capture x", "c": "at \"model.layers.1.mlp.up_proj\" scale 2",
                            "ok": "at h.1 scale 0.5"}, folder=tmp_path)
    text = str(err.value)
    assert "<spec>:1:" in text  # a's syntax error
    assert "vLLM cannot run 'capture'" in text
    assert "vLLM has no site" in text
    assert not (tmp_path / PLAN_FILE).exists()  # nothing is written for a plan that fails


def test_other_families_are_refused_naming_the_served_ones(tmp_path: Path) -> None:
    with pytest.raises(GarageError, match="llama, mistral, mixtral, qwen2, qwen3 models, not 'gpt2'"):
        build_plan(GPT2Config(n_layer=2, n_embd=32, n_head=2), {"a": "at h.1 scale 0.5"}, folder=tmp_path)


def test_names_and_bound_values_are_checked(tmp_path: Path) -> None:
    with pytest.raises(GarageError, match="identifier"):
        build_plan(CONFIG, {"not a name": "at h.1 scale 0.5"}, folder=tmp_path)
    with pytest.raises(GarageError, match="bound tensors only"):
        build_plan(CONFIG, {"a": "at h.1 module m"}, bind={"m": nn.Linear(64, 64)}, folder=tmp_path)  # type: ignore[dict-item]
    with pytest.raises(GarageError, match="'v'"):
        build_plan(CONFIG, {"a": "at h.1 add v"}, bind={"v": torch.randn(32)}, folder=tmp_path)


def test_plan_is_json_and_safetensors_and_salts_follow_values(tmp_path: Path) -> None:
    v = torch.randn(64)
    plan = build_plan(CONFIG, {"a": "at h.1 add v * 2", "b": "at h.1 add v * 2"}, bind={"v": v}, folder=tmp_path / "p1")
    assert sorted(p.name for p in plan.folder.iterdir()) == [BIND_FILE, PLAN_FILE]
    data = json.loads((plan.folder / PLAN_FILE).read_text())
    assert [e["name"] for e in data["specs"]] == ["a", "b"]
    again, bind = read_plan(plan.folder)
    assert again == plan and torch.equal(bind["v"], v)
    assert plan.index("a") == 1 and plan.index("b") == 2
    assert plan.specs[0].salt != plan.specs[1].salt  # names differ: their KV never mixes
    changed = build_plan(CONFIG, {"a": "at h.1 add v * 2", "b": "at h.1 add v * 2"}, bind={"v": v + 1},
                         folder=tmp_path / "p2")
    assert changed.specs[0].salt != plan.specs[0].salt and changed.digest != plan.digest
    same = build_plan(CONFIG, {"a": "at h.1 add v * 2", "b": "at h.1 add v * 2"}, bind={"v": v.clone()},
                      folder=tmp_path / "p3")
    assert same.digest == plan.digest
    twice = build_plan(CONFIG, {"a": "at h.1 add v * 2\nat h.2 add w"}, bind={"v": v, "w": v}, folder=tmp_path / "p4")
    assert set(read_plan(twice.folder)[1]) == {"v", "w"}  # one tensor bound under two names


def test_engine_args_key_the_compile_cache_by_the_plan(tmp_path: Path) -> None:
    from garage.models import model_folder

    folder = model_folder("tiny:llama")
    one = build_plan(CONFIG, {"a": "at h.1 scale 0.5"}, folder=tmp_path / "1")
    two = build_plan(CONFIG, {"a": "at h.2 scale 0.5"}, folder=tmp_path / "2")
    args = engine_args(folder, one, {"hf_overrides": {"rope_theta": 1.0}, "additional_config": {"mine": 1},
                                     "dtype": "float32"})
    assert args["hf_overrides"] == {"rope_theta": 1.0, "architectures": ["GarageLlamaForCausalLM"],
                                    "garage_plan": str(one.folder)}
    assert args["additional_config"] == {"mine": 1, "garage_plan": one.digest} and args["dtype"] == "float32"
    assert engine_args(folder, two, {})["additional_config"] != args["additional_config"]
    assert args["worker_extension_cls"] == "garage.vllm.extension.GarageExtension"
    assert engine_args(folder, one, {"worker_extension_cls": "my.Ext"})["worker_extension_cls"] == "my.Ext"
    assert engine_args(folder, one, {"tensor_parallel_size": 1})["tensor_parallel_size"] == 1
    for refused in ({"tensor_parallel_size": 2}, {"pipeline_parallel_size": 2}, {"speculative_config": {"method": "ngram"}}):
        with pytest.raises(ValueError, match="does not serve specs with"):
            engine_args(folder, one, refused)


def test_requests_get_their_specs_salt_and_unknown_names_are_refused(tmp_path: Path) -> None:
    plan = build_plan(CONFIG, {"steer": "at h.1 scale 0.5", "calm": "at h.2 scale 0.5"}, folder=tmp_path)

    def request(extra: Any, salt: str | None = None) -> Any:
        return SimpleNamespace(sampling_params=SimpleNamespace(extra_args=extra), cache_salt=salt)

    assert plugin.salted(request(None), str(plan.folder)).cache_salt is None
    positional = build_plan(CONFIG, {"last": "at h.1[last] scale 0.5", "at2": "at h.1[2] scale 0.5"},
                            folder=tmp_path / "positional")
    ask = request({"garage": "last"})
    ask.prompt_token_ids = [1, 2, 3]
    assert plugin.salted(ask, str(positional.folder)).cache_salt == positional.specs[0].salt + "/prompt3"
    ask = request({"garage": "at2"})  # an absolute position does not depend on the prompt's length
    ask.prompt_token_ids = [1, 2, 3]
    assert plugin.salted(ask, str(positional.folder)).cache_salt == positional.specs[1].salt
    assert plugin.salted(request({"garage": "steer"}), str(plan.folder)).cache_salt == plan.specs[0].salt
    assert plugin.salted(request({"garage": "calm"}, "user"), str(plan.folder)).cache_salt == plan.specs[1].salt + ":user"
    with pytest.raises(ValueError, match="unknown garage spec 'nope': this engine serves calm, steer"):
        plugin.salted(request({"garage": "nope"}), str(plan.folder))
    with pytest.raises(ValueError, match="serves no garage specs"):
        plugin.salted(request({"garage": "steer"}), None)


# ------------------------------------------------------------------ per-token tables and hooks
def _table(plan_names: list[str], n: int = 16) -> TokenTable:
    plan = SimpleNamespace(names=plan_names, index=lambda name: 1 + plan_names.index(name))
    return TokenTable(n, plan, torch.device("cpu"))  # type: ignore[arg-type]


def test_position_rules_match_their_definitions() -> None:
    """[last] is the prompt's last token and each new one; [new] the generated; [i], [a:b] absolute."""
    prompt = torch.tensor([5] * 8 + [3] * 4)
    pos = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3])
    expect = {
        ("last", None, None): [p == n - 1 or p >= n for p, n in zip(pos.tolist(), prompt.tolist())],
        ("prompt", None, None): [p < n for p, n in zip(pos.tolist(), prompt.tolist())],
        ("new", None, None): [p >= n for p, n in zip(pos.tolist(), prompt.tolist())],
        ("index", 2, None): [p == 2 for p in pos.tolist()],
        ("slice", 1, 4): [1 <= p < 4 for p in pos.tolist()],
        ("slice", 6, None): [p >= 6 for p in pos.tolist()],
        ("slice", None, 2): [p < 2 for p in pos.tolist()],
    }
    for rule, want in expect.items():
        assert selected(rule, pos, prompt).tolist() == want, rule


class _Layer(nn.Module):
    """Stands in for a vLLM decoder layer: returns (hidden, residual), whose sum is the block output."""

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None) -> Any:
        return hidden * 2.0, (hidden if residual is None else residual) + 1.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_block_output_ops_touch_only_their_specs_tokens_and_untouched_rows_are_exact(seed: int) -> None:
    torch.manual_seed(seed)
    table = _table(["a", "b"])
    spec = np.array([0, 1, 2, 1, 0, 2, 1])
    table.fill(spec, np.arange(7), np.full(7, 4))
    v = torch.randn(8)
    from garage import ops

    sites = SiteOps(table, [(1, None, ops.Scale(0.5)), (2, ("last", None, None), ops.Add(v, factor=3.0))])
    layer = _Layer()
    HOOKS["out"](layer, sites)
    hidden, residual = torch.randn(7, 8), torch.randn(7, 8)
    out_hidden, out_residual = layer(None, hidden, residual)
    summed = hidden * 2.0 + (residual + 1.0)  # the block output the plain layer hands on, as a sum
    after = out_hidden + out_residual  # what the next fused add-norm forms
    for row, k in enumerate(spec):
        if k == 1:
            assert torch.allclose(after[row], summed[row] * 0.5)
        elif k == 2 and row >= 3:  # positions 3.. with prompt 4: the last prompt token and new ones
            assert torch.allclose(after[row], summed[row] + 3 * v)
        else:  # untouched: the layer's own (hidden, residual) pair, bit for bit, for the next fused add-norm
            assert torch.equal(out_hidden[row], hidden[row] * 2.0) and torch.equal(out_residual[row], residual[row] + 1.0)
    # rows past the step's tokens (a padded batch) run the plain model
    table.fill(np.array([1, 1]), np.arange(2), np.full(2, 4))
    assert table.spec[2:].eq(0).all()


def test_block_input_hook_at_block_zero_has_no_residual() -> None:
    from garage import ops

    table = _table(["a"])
    table.fill(np.array([1, 0]), np.arange(2), np.full(2, 2))
    layer = _Layer()
    HOOKS["in"](layer, SiteOps(table, [(1, None, ops.Scale(3.0))]))
    hidden = torch.randn(2, 4)
    out_hidden, out_residual = layer(None, hidden, None)
    assert torch.allclose(out_residual[0], hidden[0] * 3 + 1) and torch.equal(out_residual[1], hidden[1] + 1)


def test_fill_tokens_reads_positions_under_chunked_prefill() -> None:
    """Row 0 is mid-prompt (its second chunk), row 1 decodes, row 2 starts: positions are absolute."""
    table = _table(["a", "b"])
    model = SimpleNamespace(garage_tokens=table)
    batch = SimpleNamespace(num_reqs=3, num_computed_tokens_cpu=np.array([4, 9, 0]), req_ids=["r0", "r1", "r2"],
                            num_prompt_tokens=np.array([7, 6, 2]))
    requests = {"r0": {"garage": "b"}, "r1": None, "r2": {"garage": "a"}}
    runner = SimpleNamespace(get_model=lambda: model, input_batch=batch,
                             requests={k: SimpleNamespace(sampling_params=SimpleNamespace(extra_args=v))
                                       for k, v in requests.items()})
    fill_tokens(runner, np.array([3, 1, 2]))
    assert table.spec[:6].tolist() == [2, 2, 2, 0, 1, 1]
    assert table.pos[:6].tolist() == [4, 5, 6, 9, 0, 1]
    assert table.prompt[:6].tolist() == [7, 7, 7, 6, 2, 2]


def test_garage_serve_checks_specs_before_vllm_and_passes_other_flags_on(tmp_path: Path, capsys: Any) -> None:
    from garage.cli import main
    from garage.cli.serve import vllm_argv

    bad = tmp_path / "bad.garage"
    bad.write_text("at h.1 scale 0.5\nat h.2 blade gated\n")
    assert main(["serve", "--model", "tiny:llama", "--spec", f"b={bad}", "--port", "8001"]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:2:" in err and "vLLM cannot run 'blade'" in err and "Traceback" not in err
    assert main(["serve", "--model", "tiny:llama", "--hf-overrides", "{}", "--spec", f"b={bad}"]) == 2
    assert "sets --hf-overrides itself" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--spec", "no-equals-sign"])
    with pytest.raises(SystemExit):  # only serve passes unknown flags on
        main(["check", "examples/steer.garage", "--port", "1"])
    argv = vllm_argv("/m", {"hf_overrides": {"a": [1]}, "worker_extension_cls": "x.Y"}, ["--port", "8001"])
    assert argv == ["garage serve", "--model", "/m", "--hf-overrides", '{"a": [1]}', "--worker-extension-cls", "x.Y",
                    "--port", "8001"]


def test_set_value_writes_a_buffer_in_place_and_refuses_what_is_not_there() -> None:
    from garage import ops

    table = _table(["steer"])
    add = ops.Add(torch.randn(8), factor=2.0)
    heads = ops.Heads(ops.Scale(0.5), 4, (1,))
    table.steps = {1: [add, heads]}
    address = add.factor.data_ptr()
    set_value(table, "steer", 0, "factor", -3.0)
    assert add.factor.item() == -3.0 and add.factor.data_ptr() == address
    set_value(table, "steer", 0, "vector", [1.0] * 8)
    assert torch.equal(add.vector, torch.ones(8))
    set_value(table, "steer", 1, "factor", 0.25)  # through the heads wrapper, to the op itself
    assert heads.inner.factor.item() == 0.25
    with pytest.raises(ValueError, match="unknown garage spec 'calm'"):
        set_value(table, "calm", 0, "factor", 1.0)
    with pytest.raises(ValueError, match="has 2 steps"):
        set_value(table, "steer", 2, "factor", 1.0)
    with pytest.raises(ValueError, match="Add, whose values are vector, factor, not 'std'"):
        set_value(table, "steer", 0, "std", 1.0)
    with pytest.raises(ValueError, match=r"shape \[8\], not \[3\]"):
        set_value(table, "steer", 0, "vector", [1.0, 2.0, 3.0])


def test_vllm_paths_rename_only_what_vllm_names_otherwise() -> None:
    from garage.vllm.plan import vllm_path

    assert vllm_path("mixtral", "model.layers.3.mlp.gate") == "model.layers.3.block_sparse_moe.gate"
    assert vllm_path("mixtral", "model.layers.3.self_attn.o_proj") == "model.layers.3.self_attn.o_proj"
    assert vllm_path("llama", "model.layers.3.mlp.down_proj") == "model.layers.3.mlp.down_proj"


def test_a_cached_plan_is_sealed_and_a_crafted_or_damaged_one_is_refused(tmp_path: Path, caplog: Any) -> None:
    """The plan goes into garage's cache as a sealed entry named by its digest. Editing it (a stronger
    factor, a pickle in place of the tensors) never reaches a worker: the entry is deleted with a warning,
    and reading it is a ValueError that says what to do, not a traceback from json or safetensors."""
    import logging
    import pickle

    from garage import _cache

    specs = {"a": "at h.1 add v * 2"}
    plan = build_plan(CONFIG, specs, bind={"v": torch.randn(64)})
    assert plan.folder == _cache.entry("vllm-plans", plan.digest) and (plan.folder / _cache.SEAL).is_file()
    assert read_plan(plan.folder)[0] == plan
    again = build_plan(CONFIG, specs, bind={"v": read_plan(plan.folder)[1]["v"]})
    assert again.folder == plan.folder  # the same specs and values: the same entry, not written twice

    crafted = (plan.folder / PLAN_FILE).read_text().replace("v * 2", "v * 200")
    (plan.folder / PLAN_FILE).write_text(crafted)
    with caplog.at_level(logging.WARNING, logger="garage"), pytest.raises(ValueError, match="is damaged"):
        read_plan(plan.folder)
    assert "not sealed by this cache's key" in caplog.text and not plan.folder.exists()

    class Bomb:
        def __reduce__(self) -> Any:
            return (Path.touch, (tmp_path / "ran",))

    plan = build_plan(CONFIG, specs, bind={"v": torch.randn(64)}, folder=tmp_path / "explicit")
    (plan.folder / BIND_FILE).write_bytes(pickle.dumps(Bomb()))
    with pytest.raises(ValueError, match="is damaged"):
        read_plan(plan.folder)
    (plan.folder / PLAN_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="is damaged"):
        read_plan(plan.folder)
    assert not (tmp_path / "ran").exists()
