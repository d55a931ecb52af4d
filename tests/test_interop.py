"""Control vectors (repeng, llama.cpp) read and written exactly, with direction.K at h.K; GGUF values in specs;
`garage export` to a control vector and to lm-eval's steer config, checked against hooks written here and,
where it is installed, against lm-eval's own loader."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import garage
from garage import interop
from garage.cli import main
from garage.models import load_model_and_tokenizer

gguf = pytest.importorskip("gguf")

TINY = ("--model", "tiny:llama")  # 8 blocks, hidden 128
IDS = torch.tensor([[1, 5, 9, 12, 3, 7]])


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return load_model_and_tokenizer("tiny:llama")[0]


def vector(seed: int, width: int = 128) -> torch.Tensor:
    return torch.randn(width, generator=torch.Generator().manual_seed(seed))


def repeng_export(path: Path, directions: dict[int, np.ndarray], model_type: str) -> None:
    """A control vector written as repeng's `ControlVector.export_gguf` writes one, with the gguf package."""
    writer = gguf.GGUFWriter(str(path), "controlvector")
    writer.add_string("controlvector.model_hint", model_type)
    writer.add_uint32("controlvector.layer_count", len(directions))
    for layer, direction in directions.items():
        writer.add_tensor(f"direction.{layer}", direction)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def repeng_import(path: Path) -> tuple[str, dict[int, np.ndarray]]:
    """A control vector read as repeng's `ControlVector.import_gguf` reads one."""
    reader = gguf.GGUFReader(str(path))
    assert str(bytes(reader.get_field("general.architecture").parts[-1]), "utf-8") == "controlvector"
    hint = str(bytes(reader.get_field("controlvector.model_hint").parts[-1]), "utf-8")
    return hint, {int(t.name.split(".")[1]): np.array(t.data)
                  for t in reader.tensors if t.name.startswith("direction.")}


def steered(model: torch.nn.Module, adds: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits with forward hooks adding each vector to its module's output (the first element of a tuple)."""
    def hook(v: torch.Tensor):
        return lambda module, args, out: (out[0] + v, *out[1:]) if isinstance(out, tuple) else out + v
    modules = dict(model.named_modules())
    handles = [modules[path].register_forward_hook(hook(v)) for path, v in adds.items()]
    try:
        with torch.no_grad():
            return model(input_ids=IDS).logits
    finally:
        for handle in handles:
            handle.remove()


def logits(injected: garage.InjectedModel) -> torch.Tensor:
    with torch.no_grad():
        return injected(input_ids=IDS).logits


# ------------------------------------------------------------------ reading and writing control vectors
def test_write_then_read_round_trips_exactly(tmp_path):
    directions = {7: vector(1), 1: vector(2), 4: vector(3).double().float()}
    path = interop.write_control_vector(tmp_path / "cv.gguf", directions, "llama")
    read = interop.read_control_vector(path)
    assert read.model_hint == "llama" and list(read.directions) == [1, 4, 7]
    assert all(read.directions[k].dtype == torch.float32 and torch.equal(read.directions[k], v)
               for k, v in directions.items())
    reader = gguf.GGUFReader(path)  # the fields repeng and llama.cpp read
    assert bytes(reader.get_field("general.architecture").parts[-1]) == b"controlvector"
    assert int(reader.get_field("controlvector.layer_count").parts[-1][0]) == 3
    assert {t.name: t.tensor_type.name for t in reader.tensors} == {f"direction.{k}": "F32" for k in (1, 4, 7)}


def test_a_file_repeng_writes_is_read_with_its_layers(tmp_path):
    written = {2: vector(4).numpy(), 5: vector(5).numpy()}
    repeng_export(tmp_path / "happy.gguf", written, "mistral")
    read = interop.read_control_vector(tmp_path / "happy.gguf")
    assert read.model_hint == "mistral" and list(read.directions) == [2, 5]
    assert all(np.array_equal(read.directions[k].numpy(), v) for k, v in written.items())


def test_garage_files_read_as_repeng_reads_them(tmp_path):
    directions = {3: vector(6), 6: vector(7)}
    interop.write_control_vector(tmp_path / "cv.gguf", directions, "llama")
    hint, read = repeng_import(tmp_path / "cv.gguf")
    assert hint == "llama" and sorted(read) == [3, 6]
    assert all(np.array_equal(read[k], v.numpy()) for k, v in directions.items())


def test_what_is_not_a_control_vector_is_refused(tmp_path):
    with pytest.raises(ValueError, match="block 0"):
        interop.write_control_vector(tmp_path / "a.gguf", {0: vector(1)}, "llama")
    with pytest.raises(ValueError, match="different widths"):
        interop.write_control_vector(tmp_path / "a.gguf", {1: vector(1), 2: vector(2, 64)}, "llama")
    with pytest.raises(ValueError, match=r"shape \[2, 64\]"):
        interop.write_control_vector(tmp_path / "a.gguf", {1: torch.zeros(2, 64)}, "llama")
    model_file = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(model_file), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    with pytest.raises(ValueError, match="of a 'llama' model, not a control vector"):
        interop.read_control_vector(model_file)
    writer = gguf.GGUFWriter(str(tmp_path / "odd.gguf"), "controlvector")
    writer.add_tensor("direction.1", vector(1).numpy())
    writer.add_tensor("center", vector(2).numpy())
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    with pytest.raises(ValueError, match="tensor 'center' is not a direction"):
        interop.read_control_vector(tmp_path / "odd.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="junk.gguf is not a readable GGUF file"):
        interop.read_control_vector(tmp_path / "junk.gguf")


def test_without_the_gguf_package_the_error_says_how_to_install_it(tmp_path, monkeypatch, model):
    repeng_export(tmp_path / "cv.gguf", {5: vector(1).numpy()}, "llama")
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(ValueError, match="pip install gguf"):
        interop.read_control_vector(tmp_path / "cv.gguf")
    with pytest.raises(garage.GarageError) as err:
        garage.compile(model, f'at h.5 add "{tmp_path / "cv.gguf"}#direction.5"')
    assert "needs the gguf package" in str(err.value) and "hint: pip install gguf" in str(err.value)


# ------------------------------------------------------------------ GGUF values in specs
def test_a_spec_adding_a_direction_equals_a_hook_at_that_block(tmp_path, model):
    v = vector(11)
    repeng_export(tmp_path / "x.gguf", {5: v.numpy(), 2: vector(12).numpy()}, "llama")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # direction.5 at h.5, made on a llama: nothing to warn about
        injected = garage.compile(model, f'at h.5 add "{tmp_path / "x.gguf"}#direction.5" * 2')
    reference = steered(model, {"model.layers.5": 2 * v})
    assert torch.equal(logits(injected), reference)
    assert not torch.allclose(reference, steered(model, {"model.layers.4": 2 * v}))  # the layer matters


def test_a_direction_used_at_another_block_or_model_is_warned_about(tmp_path, model):
    repeng_export(tmp_path / "x.gguf", {5: vector(1).numpy()}, "qwen2")
    report = garage.check(model, f'at h.6 add "{tmp_path / "x.gguf"}"')  # its one tensor: no #key needed
    assert {w.rule for w in report.warnings} == {"vector-layer", "vector-model"}
    assert any("made at layer 5 (h.5) but is used at layer 6" in w.message for w in report.warnings)


def test_gguf_values_that_cannot_be_used_are_errors_with_hints(tmp_path, model):
    repeng_export(tmp_path / "two.gguf", {3: vector(1).numpy(), 5: vector(2).numpy()}, "llama")
    writer = gguf.GGUFWriter(str(tmp_path / "ints.gguf"), "controlvector")
    writer.add_tensor("direction.1", np.arange(128, dtype=np.int32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + bytes(60))
    expected = {
        '"two.gguf"': ("two.gguf holds 2 tensors; name one",
                       'write "two.gguf#KEY" with KEY one of: direction.3, direction.5'),
        '"two.gguf#direction.9"': ("two.gguf has no tensor 'direction.9'",
                                   "tensors in the file: direction.3, direction.5"),
        '"ints.gguf"': ("ints.gguf: tensor 'direction.1' is stored as I32, not as floats", "F32, F16 and F64"),
        '"junk.gguf"': ("junk.gguf is not a readable GGUF file", "gguf.GGUFWriter"),
    }
    spec = tmp_path / "s.garage"
    spec.write_text("".join(f"at h.{i + 1} add {value}\n" for i, value in enumerate(expected)))
    with pytest.raises(garage.GarageError) as err:
        garage.compile(model, spec)
    found = sorted((d.line, d.column, d.message, d.hint) for d in err.value.diagnostics)
    assert [(line, column) for line, column, *_ in found] == [(1, 12), (2, 12), (3, 12), (4, 12)]
    for (_, _, message, hint), (want, want_hint) in zip(found, expected.values()):
        assert message.startswith(want) and want_hint in (hint or "")


def test_a_control_vector_becomes_the_spec_llama_cpp_would_apply(tmp_path, model):
    directions = {2: vector(1), 6: vector(2)}
    path = interop.write_control_vector(tmp_path / "cv.gguf", directions, "llama")
    text = interop.read_control_vector(path).spec(path, factor=1.5)
    assert text.splitlines()[0] == f'at h.2 add "{path}#direction.2" * 1.5'
    reference = steered(model, {f"model.layers.{k}": 1.5 * v for k, v in directions.items()})
    assert torch.allclose(logits(garage.compile(model, text)), reference, atol=1e-5)


# ------------------------------------------------------------------ garage export --to gguf
@pytest.fixture
def vectors(tmp_path) -> dict[str, torch.Tensor]:
    made = {"a": vector(21), "b": vector(22)}
    for name, v in made.items():
        save_file({"vector": v}, str(tmp_path / f"{name}.safetensors"))
    return made


def test_export_to_gguf_writes_each_blocks_factor_weighted_sum(tmp_path, capsys, vectors, model):
    spec = tmp_path / "s.garage"
    spec.write_text('at h.5 add "a.safetensors" * 2\nat h.3 add "b.safetensors"\nat h.5 add "b.safetensors" * -0.5\n'
                    "at h.*.mlp capture mlp_out\n")
    out = tmp_path / "happy.gguf"
    assert main(["export", str(spec), *TINY, "--to", "gguf", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"{out}: a control vector for llama, 2 directions")
    assert "direction.5  at h.5, norm" in printed and "from 1:1, 3:1" in printed
    read = interop.read_control_vector(out)
    assert read.model_hint == "llama" and list(read.directions) == [3, 5]
    assert torch.equal(read.directions[3], vectors["b"])
    assert torch.allclose(read.directions[5], 2 * vectors["a"] - 0.5 * vectors["b"], atol=1e-6)
    # the file steers as the spec does
    again = "".join(f'at h.{k} add "{out}#direction.{k}"\n' for k in read.directions)
    assert torch.allclose(logits(garage.compile(model, again)), logits(garage.compile(model, spec)), atol=1e-5)


def test_export_refuses_what_the_format_cannot_hold_at_its_line_and_column(tmp_path, capsys, vectors):
    spec = tmp_path / "s.garage"
    spec.write_text('at h.4 add "a.safetensors"\nat h.2 scale 0.9\nat h.4[last] add "b.safetensors"\n'
                    'at h.0..1 add "a.safetensors"\nat h.3.mlp add "b.safetensors"\n')
    out = tmp_path / "cv.gguf"
    assert main(["export", str(spec), *TINY, "--to", "gguf", "-o", str(out)]) == 1
    err = capsys.readouterr().err
    for where, what in [("2:1", "`scale` cannot be written to a control vector"),
                        ("3:1", "h.4[last]: a control vector adds at every position"),
                        ("4:1", "h.0: llama.cpp has no control vector slot for block 0"),
                        ("5:1", "h.3.mlp is not a block's output")]:
        assert f"s.garage:{where}: error: {what}" in err
    assert err.rstrip().endswith("4 errors") and not out.exists()
    assert main(["export", str(spec), *TINY, "--to", "gguf", "-o", str(out), "--skip-unsupported", "--json"]) == 0
    captured = capsys.readouterr()
    assert "s.garage:2:1: warning: `scale` cannot be written" in captured.err and "[export-skipped]" in captured.err
    printed = json.loads(captured.out)
    assert [(v["name"], v["site"], v["statements"]) for v in printed["vectors"]] == [
        ("direction.1", "h.1", ["4:1"]), ("direction.4", "h.4", ["1:1"])]
    assert [(d["line"], d["rule"]) for d in printed["skipped"]] == [(2, "export-skipped"), (3, "export-skipped"),
                                                                     (4, "export-skipped"), (5, "export-skipped")]
    assert list(interop.read_control_vector(out).directions) == [1, 4]


def test_export_has_help(capsys):
    with pytest.raises(SystemExit) as err:
        main(["export", "--help"])
    assert err.value.code == 0 and "--skip-unsupported" in capsys.readouterr().out


def test_a_spec_with_nothing_to_export_is_a_usage_error(tmp_path, capsys):
    spec = tmp_path / "s.garage"
    spec.write_text("at h.*.mlp capture mlp_out\n")
    assert main(["export", str(spec), *TINY, "--to", "gguf", "-o", str(tmp_path / "cv.gguf")]) == 2
    assert "nothing to export: the spec has no `add` that a control vector can hold" in capsys.readouterr().err


# ------------------------------------------------------------------ garage export --to lm-eval
LM_EVAL_SPEC = ('at h.5 add "a.safetensors" * 2\nat h.3.mlp add "b.safetensors" * 0.5\n'
                'at final add "a.safetensors" * -1\nat h.5 add "b.safetensors"\n')


def test_export_to_lm_eval_writes_its_steer_config(tmp_path, capsys, vectors, model):
    spec = tmp_path / "s.garage"
    spec.write_text(LM_EVAL_SPEC)
    assert main(["export", str(spec), *TINY, "--to", "lm-eval", "-o", str(tmp_path / "steer")]) == 0
    printed = capsys.readouterr().out
    path = tmp_path / "steer" / "steer.pt"
    assert printed.startswith(f"{path}: lm-eval's steer config for llama, 3 hookpoints")
    assert f"steer_path={path}" in printed
    config = torch.load(path, weights_only=True)  # as older lm-eval loads it
    assert list(config) == ["layers.5", "layers.3.mlp", "norm"]  # paths in model.base_model, as lm-eval hooks them
    assert all(set(entry) == {"steering_vector", "steering_coefficient", "action", "bias", "head_index"}
               and entry["action"] == "add" and entry["bias"] is None and entry["head_index"] is None
               for entry in config.values())
    assert torch.equal(config["layers.3.mlp"]["steering_vector"], vectors["b"])
    assert config["layers.3.mlp"]["steering_coefficient"] == 0.5 and config["norm"]["steering_coefficient"] == -1.0
    assert torch.allclose(config["layers.5"]["steering_vector"], 2 * vectors["a"] + vectors["b"], atol=1e-6)
    assert config["layers.5"]["steering_coefficient"] == 1.0
    base = dict(model.base_model.named_modules())
    assert all(hook in base for hook in config)
    # lm-eval's hook, as hf_steered.py writes it: coefficient × vector added to the module's (first) output
    hooked = steered(model, {f"model.{hook}": entry["steering_coefficient"] * entry["steering_vector"]
                             for hook, entry in config.items()})
    assert torch.allclose(hooked, logits(garage.compile(model, spec)), atol=1e-5)


def test_lm_eval_loads_the_export_and_steers_as_the_spec_does(tmp_path, vectors, model):
    hf_steered = pytest.importorskip("lm_eval.models.hf_steered")  # pip install --no-deps lm_eval
    spec = tmp_path / "s.garage"
    spec.write_text(LM_EVAL_SPEC)
    written = interop.export(garage.compile(model, spec), "lm-eval", tmp_path / "cfg.pt")
    assert written.path == str(tmp_path / "cfg.pt")
    tokenizer = load_model_and_tokenizer("tiny:llama")[1]
    lm = hf_steered.SteeredModel(pretrained=model, steer_path=written.path, tokenizer=tokenizer, device="cpu",
                                 batch_size=1)
    assert sorted(lm.hook_to_steer) == ["layers.3.mlp", "layers.5", "norm"]
    with torch.no_grad():
        theirs = lm.forward(input_ids=IDS).logits
    assert torch.allclose(theirs, logits(garage.compile(model, spec)), atol=1e-5)
    assert not any(m._forward_hooks for m in model.modules())  # lm-eval removed its hooks


def test_lm_eval_hookpoints_are_paths_in_the_base_model():
    gpt2 = load_model_and_tokenizer("tiny:gpt2")[0]
    assert interop.hookpoint(gpt2, "transformer.h.5") == "h.5" and interop.hookpoint(gpt2, "lm_head") is None


def test_lm_eval_export_refuses_inputs_and_positions(tmp_path, model, vectors):
    injected = garage.compile(model, 'at h.3.in add a; at embed add a; at h.2[new] add a', bind={"a": vectors["a"]})
    with pytest.raises(interop.UnsupportedError) as err:
        interop.export(injected, "lm-eval", tmp_path)
    messages = [(d.column, d.message) for d in err.value.diagnostics]
    assert messages == [(1, "h.3.in is not a module's output, the only thing lm-eval's hooks change"),
                        (18, "embed is not a module's output, the only thing lm-eval's hooks change"),
                        (34, "h.2[new]: lm-eval's steered model adds at every position")]
