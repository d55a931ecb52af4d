"""Training injections: only the injected parameters learn, the model is untouched, and what was learned
saves, loads and runs back exactly."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors import safe_open
from zoo import tiny_model

import garage
from garage.cli import main
from garage.models import char_tokenizer
from garage.training import IGNORE, examples

TOKENIZER = char_tokenizer()
SAME = ["aaaaaaaaaaaaaaaa", "aaaaaaaaaaa", "aaaaaaaaaaaaaaaaaaaa"]  # a learnable target: always say "a"


def digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def test_a_learned_vector_teaches_a_fixed_token_and_nothing_else_changes():
    model = tiny_model("llama")
    before = digest(model)
    inj = garage.compile(model, "at h.3 add learn")
    history = garage.train(inj, SAME, steps=50, lr=0.1, batch_size=4, tokenizer=TOKENIZER)
    assert len(history.records) == 50 and not history.interrupted
    assert history.losses[-1] < history.losses[0] - 0.5, history.losses[::10]  # nats; the final norm bounds logits
    a = TOKENIZER("a", add_special_tokens=False)["input_ids"][0]
    ids = torch.tensor([TOKENIZER("xyz qrs")["input_ids"]])
    with torch.no_grad():
        assert (model(input_ids=ids).logits.argmax(-1) != a).all()
        assert (inj(input_ids=ids).logits.argmax(-1) == a).all()  # it now says "a" after anything
    assert digest(model) == before  # the model's own parameters are byte-identical
    assert all(p.requires_grad for p in model.parameters())  # and left as they were found
    (vector,) = list(inj.parameters())
    assert vector.abs().sum() > 0 and history.records[-1].strengths["1:1/h.3"] == pytest.approx(vector.detach().norm().item())


def test_only_the_completion_carries_loss():
    (ids, labels), = examples([{"prompt": "Q: 2+2?", "completion": " 4"}], TOKENIZER, 64)
    prompt = TOKENIZER("Q: 2+2?")["input_ids"]
    assert ids == prompt + TOKENIZER(" 4", add_special_tokens=False)["input_ids"]
    assert labels[: len(prompt)] == [IGNORE] * len(prompt) and labels[len(prompt):] == ids[len(prompt):]
    with pytest.raises(ValueError, match="a training example is a text"):
        examples([{"question": "x"}], TOKENIZER, 64)


SPEC = "at h.1 blade gated from model src project linear alpha 0.3\nat h.2 add learn from v * 0.5\n"


def trained(seed: int = 3):
    model = tiny_model("llama")
    source = tiny_model("llama", seed=1, hidden_size=96, intermediate_size=192)
    bind = {"src": source, "v": torch.randn(64, generator=torch.Generator().manual_seed(seed))}
    inj = garage.compile(model, SPEC, bind=bind)
    garage.train(inj, ["hello there", "general kenobi", "you are a bold one"], steps=4, lr=0.05, batch_size=2,
                 tokenizer=TOKENIZER, seed=seed)
    return model, bind, inj


def test_saved_params_load_back_and_reproduce_the_logits_exactly(tmp_path):
    model, bind, inj = trained()
    path = inj.save_params(tmp_path / "trained.safetensors")
    loaded = garage.compile(model, SPEC, bind=bind, params=path)
    fresh = garage.compile(model, SPEC, bind=bind)
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, inj(input_ids=ids).logits)
        assert not torch.allclose(fresh(input_ids=ids).logits, inj(input_ids=ids).logits)
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == {"1:1/h.1/blade/gate.weight", "1:1/h.1/blade/gate.bias",
                                 "1:1/h.1/blade/source.linear.weight", "2:1/h.2/add/vector"}
        assert f.metadata()["model_type"] == "llama" and "add learn from v * 0.5" in f.metadata()["spec"]


@pytest.mark.parametrize("spec, model, message", [
    ("at h.2 add learn from v * 0.5", "llama", "holds values for statements this spec does not have"),
    (SPEC.replace("h.2", "h.3"), "llama", "has no value for 2:1/h.3/add/vector"),
    (SPEC, "qwen2", "was trained on a llama model, not qwen2"),
])
def test_a_params_file_that_does_not_fit_the_spec_is_a_diagnostic(tmp_path, spec, model, message):
    _, bind, inj = trained()
    path = inj.save_params(tmp_path / "trained.safetensors")
    with pytest.raises(garage.ValidationError, match=message):
        garage.compile(tiny_model(model), spec, bind=bind, params=path)


def test_a_params_file_of_other_shapes_names_the_statement(tmp_path):
    inj = garage.compile(tiny_model("llama"), "at h.2 add learn")
    path = inj.save_params(tmp_path / "p.safetensors")
    narrow = tiny_model("llama", hidden_size=32, intermediate_size=64)
    with pytest.raises(garage.ValidationError) as err:
        garage.compile(narrow, "at h.2 add learn", params=path)
    (diagnostic,) = err.value.diagnostics
    assert "holds 1:1/h.2/add/vector with shape [64], but this statement's is [32]" in diagnostic.message
    assert (diagnostic.line, diagnostic.column) == (1, 1)


def test_an_interrupted_run_keeps_what_it_learned(tmp_path):
    inj = garage.compile(tiny_model("llama"), "at h.3 add learn")

    def stop(record):
        if record.step == 3:
            raise KeyboardInterrupt

    history = garage.train(inj, SAME, steps=50, lr=0.1, tokenizer=TOKENIZER, on_step=stop)
    assert history.interrupted and len(history.records) == 3
    path = inj.save_params(tmp_path / "p.safetensors")
    again = garage.compile(inj.model, "at h.3 add learn", params=path)
    assert torch.equal(next(again.parameters()), next(inj.parameters()))


def test_nothing_to_train_and_unknown_tokenizers_are_clear_errors():
    with pytest.raises(ValueError, match="nothing to train"):
        garage.train(garage.compile(tiny_model("llama"), "at h.1 scale 0.5"), SAME, tokenizer=TOKENIZER)
    with pytest.raises(ValueError, match="pass tokenizer="):
        garage.train(garage.compile(tiny_model("llama"), "at h.1 add learn"), SAME)


def test_garage_train_on_the_command_line_saves_and_run_uses_it(tmp_path, capsys, monkeypatch):
    spec = tmp_path / "steer.garage"
    spec.write_text("at h.3 add learn\n")
    data = tmp_path / "a.txt"
    data.write_text("\n".join(SAME) + "\n")
    held = tmp_path / "held.jsonl"
    held.write_text(json.dumps({"prompt": "say a:", "completion": "aaaa"}) + "\n")
    out = tmp_path / "trained.safetensors"
    assert main(["train", str(spec), "--model", "tiny:llama", "--data", str(data), "--eval", str(held),
                 "--steps", "6", "--lr", "0.1", "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert "step 6/6" in captured.err and "eval" in captured.err and f"{out}: 128 learned values in 1 tensors after 6 steps" in captured.out
    assert main(["run", str(spec), "--model", "tiny:llama", "--params", str(out), "--prompt", "a",
                 "--max-new-tokens", "3"]) == 0
    calls = {"n": 0}
    real = garage.training.lm_loss

    def interrupted(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(garage.training, "lm_loss", interrupted)
    assert main(["train", str(spec), "--model", "tiny:llama", "--data", str(data), "--steps", "50",
                 "-o", str(out)]) == 0
    assert "interrupted after 2 of 50 steps" in capsys.readouterr().err
    loaded = garage.compile(garage.models.load_model("tiny:llama"), spec, params=out)  # a valid file
    assert next(loaded.parameters()).abs().sum() > 0  # holding what the two steps before Ctrl-C learned
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n[1, 2]\n')
    assert main(["train", str(spec), "--model", "tiny:llama", "--data", str(bad), "-o", str(out)]) == 2
    assert "bad.jsonl:2: expected an object" in capsys.readouterr().err


@pytest.mark.slow
def test_a_compiled_training_step_has_no_graph_break_and_learns_the_same():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager = garage.compile(tiny_model("llama"), "at h.3 add learn")
    compiled = garage.compile(tiny_model("llama"), "at h.3 add learn", compile=True)
    a = garage.train(eager, SAME, steps=5, lr=0.1, batch_size=2, tokenizer=TOKENIZER)
    b = garage.train(compiled, SAME, steps=5, lr=0.1, batch_size=2, tokenizer=TOKENIZER)
    assert not counters["graph_break"] and counters["stats"]["unique_graphs"] == 1  # one shape, one graph
    assert b.losses == pytest.approx(a.losses, rel=1e-4)


def test_training_in_bfloat16_keeps_the_dtype_and_lowers_the_loss():
    """What a GPU run does (bf16 weights, the loss taken in float32), here on the CPU."""
    model = tiny_model("llama").to(torch.bfloat16)
    inj = garage.compile(model, "at h.3 add learn; at h.1 blade gated from model src",
                         bind={"src": tiny_model("llama", seed=1).to(torch.bfloat16)})
    history = garage.train(inj, SAME, steps=20, lr=0.1, batch_size=4, tokenizer=TOKENIZER)
    assert all(p.dtype == torch.bfloat16 for p in inj.parameters())
    assert history.losses[-1] < history.losses[0] - 0.3
