"""Files garage reads from disk never run code: hostile graph-cache entries and hostile `.pt2` archives.

Each attack carries a payload that creates a marker file if it ever runs. The cache attacks are tried
twice: as an attacker who can only edit files (the entry's seal then fails) and as one who also holds the
cache's key (the entry is sealed again, and the format's own checks must refuse it). Either way the marker
never appears, and the numbers equal a run with the cache off.
"""

from __future__ import annotations

import io
import json
import logging
import pathlib
import shutil
import zipfile

import pytest
import torch
from transformers import LlamaForCausalLM
from zoo import tiny_config, tiny_model

import garage
from garage import _cache
from garage.lang.diagnostics import ValidationError

SPEC = "at h.0 scale 0.8\nat h.1[last] add v * 2"


def small_llama():
    """Two blocks: each hostile entry costs the exports it forces again, so they are kept short."""
    return tiny_model("llama", seed=6, num_hidden_layers=2)


def run_spec(model) -> tuple[torch.Tensor, torch.Tensor]:
    """Scoring on a padded batch (the scoring graph) and greedy generation (the step graph)."""
    vector = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    injected = garage.compile(model, SPEC, bind={"v": vector})
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, 100, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    with torch.no_grad():
        logits = injected(input_ids=ids, attention_mask=mask).logits
    return logits, injected.generate(ids, attention_mask=mask, max_new_tokens=4)


@pytest.fixture(scope="module")
def filled(tmp_path_factory):
    """A cache holding the scoring and step graphs of the tiny llama, and the same run with the cache off."""
    folder = tmp_path_factory.mktemp("filled")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GARAGE_CACHE", "off")
        want = run_spec(small_llama())
        patch.setenv("GARAGE_CACHE", str(folder))
        run_spec(small_llama())
    return folder, want


# ------------------------------------------------------------------ payloads (edits of a graph.json)
def call_chain(desc: dict, marker: pathlib.Path) -> None:
    """Ten allowlisted-looking calls after the inputs that reach `__import__` through a tensor's class:
    x.__class__.__repr__.__globals__['__builtins__']['__import__']('pathlib').Path(marker).touch()."""
    nodes = desc["graph"]["nodes"]
    inputs = [i for i, n in enumerate(nodes) if n["op"] == "placeholder"]
    first = inputs[-1] + 1
    steps = [("builtins.getattr", [{"n": nodes[inputs[0]]["name"]}, "__class__"]), ("builtins.getattr", ["__repr__"]),
             ("builtins.getattr", ["__globals__"]), ("operator.getitem", ["__builtins__"]),
             ("operator.getitem", ["__import__"]), ("operator.call", ["pathlib"]), ("builtins.getattr", ["Path"]),
             ("operator.call", [str(marker)]), ("builtins.getattr", ["touch"]), ("operator.call", [])]
    chain = []
    for i, (target, args) in enumerate(steps):
        args = args if i == 0 else [{"n": f"evil{i - 1}"}, *args]
        chain.append({"name": f"evil{i}", "op": "call_function", "target": {"py": target}, "args": args})
    nodes[first:first] = chain


def pasted_default(desc: dict, marker: pathlib.Path) -> None:
    """The last input name carries a default value, which Python evaluates when fx generates the code."""
    desc["graph"]["pytree"]["orig_args"][-1] += f"=__import__('pathlib').Path({str(marker)!r}).touch()"


def pasted_keyword(desc: dict, marker: pathlib.Path) -> None:
    """A keyword argument's name that closes the call and runs an expression of its own."""
    node = next(n for n in desc["graph"]["nodes"] if n["op"] == "call_function")
    node.setdefault("kwargs", {})[f"x=__import__('pathlib').Path({str(marker)!r}).touch(), y"] = 1


def seal_again(folder: pathlib.Path) -> None:
    """What an attacker holding the cache's key could do: seal the edited entry again."""
    files = {name: path for name, path in _cache._paths(folder).items() if name != _cache.SEAL}
    (folder / _cache.SEAL).write_text(_cache._seal(folder, dict(files)), encoding="ascii")


@pytest.mark.parametrize("resealed", [False, True], ids=["edited", "resealed"])
@pytest.mark.parametrize("payload", [call_chain, pasted_default, pasted_keyword])
def test_a_hostile_cache_entry_never_runs(payload, resealed, filled, tmp_path, monkeypatch, caplog):
    folder, want = filled
    cache = tmp_path / "cache"
    shutil.copytree(folder, cache)
    marker = tmp_path / "pwned"
    graphs = [p for p in (cache / "graphs").iterdir() if not p.name.startswith(".")]
    assert len(graphs) == 2
    for entry in graphs:
        desc = json.loads((entry / "graph.json").read_text())
        payload(desc, marker)
        (entry / "graph.json").write_text(json.dumps(desc))
        if resealed:
            seal_again(entry)
    monkeypatch.setenv("GARAGE_CACHE", str(cache))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="garage"):
        got = run_spec(small_llama())
    assert not marker.exists()
    why = "ignoring the cached" if resealed else "is not sealed by this cache's key"
    assert caplog.text.count(why) == 2 and caplog.text.count("exported the") == 2
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_a_cache_whose_key_others_can_read_is_off(filled, tmp_path, monkeypatch, caplog):
    cache = tmp_path / "cache"
    shutil.copytree(filled[0], cache)
    (cache / _cache.KEY).chmod(0o644)
    monkeypatch.setenv("GARAGE_CACHE", str(cache))
    with caplog.at_level(logging.WARNING, logger="garage"):
        assert _cache.entry("graphs", "x") is None
    assert "is off" in caplog.text and "0600" in caplog.text


# ------------------------------------------------------------------ guards
class ShortPromptPath(LlamaForCausalLM):
    """A model whose code branches on the prompt length: a graph traced on 8 tokens guards `length >= 4`,
    and shorter prompts run by hooks."""

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        out = super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if input_ids.shape[1] < 4:  # a path export never sees
            out.logits = out.logits.clone()
        return out


def scaled_block_one(model, ids, mask) -> torch.Tensor:
    """The reference: block 1's output times 0.5, by a hook of the test's own."""
    def hook(_module, _args, out):
        return (out[0] * 0.5, *out[1:]) if isinstance(out, tuple) else out * 0.5

    handle = model.model.layers[1].register_forward_hook(hook)
    try:
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask).logits
    finally:
        handle.remove()


def test_cached_graphs_refuse_the_inputs_a_fresh_export_refuses(tmp_path, monkeypatch, caplog):
    g = torch.Generator().manual_seed(4)
    short, long = torch.randint(0, 100, (2, 3), generator=g), torch.randint(0, 100, (2, 6), generator=g)
    decisions, logs = [], []
    for setting in ("off", str(tmp_path / "cache"), str(tmp_path / "cache")):  # no cache, written, read back
        monkeypatch.setenv("GARAGE_CACHE", setting)
        torch.manual_seed(0)
        model = ShortPromptPath(tiny_config("llama")).eval()
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="garage"):
            injected = garage.compile(model, "at h.1 scale 0.5")
            for ids in (long, short):
                mask = torch.ones_like(ids)
                mask[0, 0] = 0  # padded: the scoring graph, whose guards say length >= 4
                with torch.no_grad():
                    got = injected(input_ids=ids, attention_mask=mask).logits
                assert torch.allclose(got, scaled_block_one(model, ids, mask), atol=1e-5)
        decisions.append(sorted(injected.fallbacks))
        logs.append(caplog.text)
    assert decisions == [["scoring"]] * 3  # the short batch ran by hooks every time, after the guard refused it
    assert "exported the" not in logs[2] and logs[2].count("loaded the cached") == 2  # the step and scoring graphs


# ------------------------------------------------------------------ .pt2 archives
class Touch:
    """Unpickled, it creates a file: the payload of a hostile pickle."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.path),)


def rewritten(source: pathlib.Path, target: pathlib.Path, edit) -> pathlib.Path:
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as out:
        for info in original.infolist():
            out.writestr(info, edit(info.filename, original.read(info.filename)))
    return target


def pickled(marker: pathlib.Path) -> bytes:
    buffer = io.BytesIO()
    torch.save(Touch(marker), buffer)
    return buffer.getvalue()


def sample_inputs(marker: pathlib.Path):
    """torch loads sample inputs weights-only, then retries with full pickle when that fails."""
    return lambda name, data: pickled(marker) if "/data/sample_inputs/" in name else data


def pickled_weight(marker: pathlib.Path):
    """A weight flagged `use_pickle`, which torch unpickles with weights_only=False."""
    def edit(name: str, data: bytes) -> bytes:
        if name.endswith("_weights_config.json"):
            config = json.loads(data)
            paths = [v["path_name"] for v in config["config"].values()]
            alone = next(k for k, v in config["config"].items() if paths.count(v["path_name"]) == 1)  # not tied
            config["config"][alone]["use_pickle"] = True
            return json.dumps(config).encode()
        return data
    return edit


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pt2")
    injected = garage.compile(tiny_model("gpt2", seed=2), "at h.1 scale 0.5")
    return pathlib.Path(injected.save(folder / "steered.pt2"))


@pytest.mark.parametrize("attack", ["sample inputs", "pickled weight"])
def test_a_hostile_pt2_is_refused_before_anything_is_unpickled(attack, saved, tmp_path):
    marker = tmp_path / "pwned"
    if attack == "sample inputs":
        hostile = rewritten(saved, tmp_path / "hostile.pt2", sample_inputs(marker))
    else:
        flagged = rewritten(saved, tmp_path / "flagged.pt2", pickled_weight(marker))
        with zipfile.ZipFile(flagged) as archive:
            config = json.loads(next(archive.read(n) for n in archive.namelist() if n.endswith("_weights_config.json")))
        path = next(v["path_name"] for v in config["config"].values() if v["use_pickle"])
        hostile = rewritten(flagged, tmp_path / "hostile.pt2",
                            lambda name, data: pickled(marker) if name.endswith(f"/data/weights/{path}") else data)
    with pytest.raises(ValidationError) as err:
        garage.load_artifact(hostile)
    assert not marker.exists()
    message = str(err.value)
    assert str(hostile) in message and "unpickle" in message and "garage's inj.save" in message
    with pytest.raises(Exception):  # the attack is real: torch's own loader runs the payload
        torch.export.load(hostile)
    assert marker.exists()


@pytest.mark.parametrize(("part", "content", "says"), [
    ("_weights_config.json", b"{not json", "an unreadable payload config"),
    ("_weights_config.json", b"[1, 2]", "an unreadable payload config"),
    ("/models/model.json", b"{]", "torch cannot read the program"),
], ids=["garbled-config", "config-not-an-object", "garbled-program"])
def test_a_damaged_pt2_is_a_diagnostic_naming_the_file(part, content, says, saved, tmp_path):
    damaged = rewritten(saved, tmp_path / "damaged.pt2", lambda name, data: content if name.endswith(part) else data)
    with pytest.raises(ValidationError, match=says) as err:
        garage.load_artifact(damaged)
    assert str(err.value).startswith(f"{damaged}: error: garage will not load {damaged}")


def test_a_saved_program_still_loads_and_an_aoti_package_needs_consent(saved, tmp_path):
    program = garage.load_artifact(saved)
    ids = torch.randint(0, 100, (2, 5))
    assert program(input_ids=ids, attention_mask=torch.ones_like(ids)).shape == (2, 5, 128)
    package = tmp_path / "package.pt2"
    shutil.copy(saved, package)
    with zipfile.ZipFile(package, "a") as archive:
        archive.writestr("package/data/aotinductor/model/model.so", b"\x7fELF")
    with pytest.raises(ValidationError, match="native=True"):
        garage.load_artifact(package)
    with pytest.raises(ValidationError, match="not a readable .pt2"):
        garage.load_artifact(tmp_path / "missing.pt2")
