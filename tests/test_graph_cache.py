"""Exported graphs kept on disk: a later process loads them instead of exporting, and gets the same numbers.

The reference is always a fresh export (or the plain model), never the cache itself; an entry that does
not fit, is damaged, or asks for something outside the format's allowlist is exported again. Hostile
entries are in tests/test_untrusted_files.py.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading

import pytest
import torch
from zoo import tiny_model

import garage
from garage import _cache
from garage.fx import store
from garage.fx.kinds import Scoring, Step, Unpadded

SPEC = "at h.1 scale 0.8\nat h.2[last] add v * 2"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GARAGE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def entries(cache) -> list:
    folder = cache / "graphs"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def batch(seed: int, vocab: int = 64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding: the masked scoring graph
    return {"input_ids": ids, "attention_mask": mask}


def run_spec(model, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    vector = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(seed))
    injected = garage.compile(model, SPEC, bind={"v": vector})
    inputs = batch(seed)
    with torch.no_grad():
        logits = injected(**inputs).logits
    return logits, injected.generate(inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=4)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_second_model_loads_every_graph_and_computes_the_same(arch, cache, caplog):
    first = tiny_model(arch, seed=1)
    want = run_spec(first, seed=5)
    kept = entries(cache)
    assert len(kept) == 2  # scoring (the batch is padded) and the generation step
    second = tiny_model(arch, seed=1)  # a new instance: nothing in memory, everything on disk
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="garage"):
        got = run_spec(second, seed=5)
    assert "exported" not in caplog.text and caplog.text.count("loaded the cached") == 2
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert entries(cache) == kept


def kept(model, kind):
    """A fresh export of `kind`, written to the cache and read back: (fresh, loaded)."""
    fresh = kind.export(model)
    store.write_entry(store.entry(model, kind), model, kind, fresh)
    return fresh, store.read_entry(store.entry(model, kind), model, kind)


def test_loaded_graphs_share_the_live_weights(cache):
    model = tiny_model("llama", seed=2)
    _, loaded = kept(model, Step())
    params = {id(p) for p in model.parameters()}
    assert loaded is not None and all(id(p) in params for p in loaded.parameters())
    with torch.no_grad():  # so a change to the model's weights is a change to the loaded graph
        model.model.layers[0].mlp.down_proj.weight.mul_(2)
    assert any(p is model.model.layers[0].mlp.down_proj.weight for p in loaded.parameters())
    _, scored = kept(model, Scoring())
    inputs = batch(4)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.mul_(-0.5)  # after loading: the loaded graph must see it
        assert torch.equal(scored(**inputs).logits, model(**inputs).logits)


def step_inputs(seed: int) -> tuple:
    """A prompt step over a fresh 12-slot cache of the tiny qwen2 (2 kv heads of 16), random tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (2, 5), generator=g)
    mask = torch.zeros(2, 12, dtype=torch.long)
    mask[:, :5] = 1
    positions = torch.arange(5).expand(2, 5).contiguous()
    past = tuple(torch.zeros(2, 2, 12, 16) for _ in range(8))
    return ids, mask, positions, torch.full((2,), 5), torch.arange(5), past


@pytest.mark.parametrize("kind", [Scoring(), Step(), Unpadded()], ids=["scoring", "step", "unpadded"])
def test_every_graph_kind_round_trips_to_the_same_numbers(kind, cache):
    model = tiny_model("qwen2", seed=3)
    fresh, loaded = kept(model, kind)
    assert loaded is not None
    assert [(n.name, n.op, str(n.target)) for n in loaded.graph.nodes] == \
        [(n.name, n.op, str(n.target)) for n in fresh.graph.nodes]
    with torch.no_grad():
        for seed in (1, 2):
            if isinstance(kind, Step):
                got, want = loaded(*step_inputs(seed)), fresh(*step_inputs(seed))
            else:
                inputs = batch(seed) if isinstance(kind, Scoring) else {"input_ids": batch(seed)["input_ids"]}
                got, want = loaded(**inputs).logits, fresh(**inputs).logits
            assert torch.equal(got, want)


def test_a_changed_model_or_version_is_exported_again(cache, monkeypatch):
    model = tiny_model("llama", seed=4)
    key = store.fingerprint(model, Step())
    assert key == store.fingerprint(tiny_model("llama", seed=9), Step())  # weights are not in the key
    assert key != store.fingerprint(tiny_model("llama", seed=4, rope_theta=123.0), Step())
    assert key != store.fingerprint(model, Unpadded())
    assert key != store.fingerprint(model.to(torch.float64), Step())
    model.to(torch.float32)
    moved = tiny_model("llama", seed=4)
    moved.config._name_or_path = "/another/folder"  # the same model loaded from elsewhere: the same graph
    moved.config.transformers_version = "5.0.0"
    assert store.fingerprint(moved, Step()) == key
    monkeypatch.setattr(store, "__version__", "0.0.0-other")
    assert key != store.fingerprint(model, Step())
    monkeypatch.undo()
    monkeypatch.setattr(store, "_code_hash", lambda: "garage's graph code, edited")
    assert key != store.fingerprint(model, Step())


def test_models_with_patched_forwards_are_not_cached(cache):
    model = tiny_model("llama", seed=4)
    model.model.layers[1].mlp.forward = lambda x: x  # code that no file holds
    assert store.fingerprint(model, Step()) is None
    assert store.entry(model, Step()) is None
    run_spec(model, seed=1)
    assert entries(cache) == []


def test_a_damaged_entry_is_deleted_and_exported_again(cache, caplog):
    model = tiny_model("llama", seed=6)
    want = run_spec(model, seed=1)
    for name in entries(cache):
        (cache / "graphs" / name / "graph.json").write_text("{not json")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="garage"):
        got = run_spec(tiny_model("llama", seed=6), seed=1)
    assert caplog.text.count("is not sealed by this cache's key") == 2 and caplog.text.count("exported the") == 2
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert len(entries(cache)) == 2  # written again, whole


def broken(*args):
    raise RuntimeError("the format tripped")


def test_a_model_without_a_key_is_simply_not_cached(cache, monkeypatch):
    monkeypatch.setattr(store, "_source_hash", broken)  # e.g. a class whose source file cannot be read
    model = tiny_model("llama", seed=5)
    assert store.fingerprint(model, Step()) is None
    run_spec(model, seed=3)
    assert entries(cache) == []


def test_a_cache_that_fails_to_write_never_breaks_compiling(cache, monkeypatch, caplog):
    want = run_spec(tiny_model("llama", seed=5), seed=3)
    monkeypatch.setattr(store._graph_format, "dump", broken)
    fresh = tiny_model("llama", seed=5, rope_theta=77.0)  # a config with nothing cached yet
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="garage"):
        garage.compile(fresh, SPEC, bind={"v": torch.randn(fresh.config.hidden_size)})
    assert "could not cache the step graph" in caplog.text and "the format tripped" in caplog.text
    assert torch.equal(run_spec(tiny_model("llama", seed=5), seed=3)[1], want[1])


def test_the_cache_can_be_turned_off(tmp_path, monkeypatch):
    monkeypatch.setenv("GARAGE_CACHE", "off")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    run_spec(tiny_model("llama", seed=7), seed=2)
    assert _cache.root() is None and not any(tmp_path.iterdir())


def test_concurrent_writers_leave_one_whole_entry(cache):
    models = [tiny_model("llama", seed=8) for _ in range(4)]
    graph = Step().export(models[0])
    errors: list[BaseException] = []

    def write(model) -> None:
        try:
            store.write_entry(store.entry(model, Step()), model, Step(), graph)
        except BaseException as err:  # noqa: BLE001  # reported below
            errors.append(err)

    threads = [threading.Thread(target=write, args=(m,)) for m in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(entries(cache)) == 1
    assert not [p for p in (cache / "graphs").iterdir() if p.name.endswith(".tmp")]  # no temporary folder left
    assert store.read_entry(store.entry(models[3], Step()), models[3], Step()) is not None


def test_processes_that_need_one_graph_export_it_once_and_compute_the_same(cache):
    """Two fresh processes at once: one exports (holding the entry's lock), the other waits and loads."""
    script = (
        "import logging, sys, torch, garage; logging.basicConfig(level=logging.INFO)\n"
        "from garage.models import load_model_and_tokenizer\n"
        "model, tok = load_model_and_tokenizer('tiny:llama')\n"
        "ids = tok(['hello there', 'a b'], return_tensors='pt', padding=True)\n"
        "inj = garage.compile(model, 'at h.3 scale 1.5')\n"
        "out = inj.generate(ids.input_ids, attention_mask=ids.attention_mask, max_new_tokens=5)\n"
        "print(out.tolist(), inj(**ids).logits.double().sum().item())\n"
    )
    runs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    results = [run.communicate() for run in runs]
    assert all(run.returncode == 0 for run in runs), [err for _, err in results]
    logs = [err for _, err in results]
    for kind in ("step", "(('attention_mask', torch.int64), ('input_ids', torch.int64))"):
        assert sum(log.count(f"exported the {kind} graph") for log in logs) == 1, logs  # the other waited
        assert sum(log.count(f"loaded the cached {kind} graph") for log in logs) == 1, logs
    assert results[0][0] == results[1][0]


def test_writing_is_all_or_nothing(cache):
    target = _cache.entry("graphs", "x")
    with pytest.raises(RuntimeError), _cache.writing(target) as tmp:
        (tmp / "half").write_text("...")
        raise RuntimeError("interrupted")
    assert not target.exists() and not list((cache / "graphs").iterdir())
    with _cache.writing(target) as tmp:
        (tmp / "a").write_text("first")
        with _cache.writing(target) as other:  # another writer finishes first: the first rename wins
            (other / "a").write_text("second")
    assert (target / "a").read_text() == "second" and len(list((cache / "graphs").iterdir())) == 1
    assert _cache.read(target) == {"a": b"second"}  # sealed as a whole


@pytest.mark.parametrize("seal", [b"", b"0" * 64, b"\xff\xfe not even ascii"], ids=["empty", "wrong", "binary"])
def test_an_entry_with_a_bad_seal_is_deleted_not_read(seal, cache, caplog):
    target = _cache.entry("graphs", "y")
    with _cache.writing(target) as tmp:
        (tmp / "a").write_text("content")
    (target / _cache.SEAL).write_bytes(seal)
    with caplog.at_level(logging.WARNING, logger="garage"):
        assert _cache.read(target) is None
    assert not target.exists() and "is not sealed by this cache's key" in caplog.text
