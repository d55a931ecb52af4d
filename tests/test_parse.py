"""Golden tests: every construct of docs/language.md parses to the AST it means."""

import pytest

import garage
from garage.lang import spec as ast


def one(text: str) -> ast.Statement:
    spec = garage.parse(text)
    assert len(spec) == 1
    return spec.statements[0]


def site(text: str) -> ast.Site:
    return one(f"at {text} zero").site


def op(text: str) -> ast.Op:
    return one(f"at h.0 {text}").op


@pytest.mark.parametrize(
    "text, expected",
    [
        ("h.6", ast.BlockSite(ast.Index(6))),
        ("h.6.out", ast.BlockSite(ast.Index(6))),
        ("layer.6", ast.BlockSite(ast.Index(6))),
        ("layers.6", ast.BlockSite(ast.Index(6))),
        ("blocks.6", ast.BlockSite(ast.Index(6))),
        ("6", ast.BlockSite(ast.Index(6))),
        ("h.6.in", ast.BlockSite(ast.Index(6), "in")),
        ("h.6.attn", ast.BlockSite(ast.Index(6), "attn")),
        ("h.6.mlp", ast.BlockSite(ast.Index(6), "mlp")),
        ("h.-1", ast.BlockSite(ast.Index(-1))),
        ("-1", ast.BlockSite(ast.Index(-1))),
        ("N-4", ast.BlockSite(ast.NIndex(-4))),
        ("h.N+0", ast.BlockSite(ast.NIndex(0))),
        ("N - 1", ast.BlockSite(ast.NIndex(-1))),
        ("87.5%", ast.BlockSite(ast.PercentIndex(87.5))),
        ("h.50%.mlp", ast.BlockSite(ast.PercentIndex(50.0), "mlp")),
        ("h.2..5", ast.BlockSite(ast.LayerRange(ast.Index(2), ast.Index(5)))),
        ("2..N-1", ast.BlockSite(ast.LayerRange(ast.Index(2), ast.NIndex(-1)))),
        ("h.*", ast.BlockSite(ast.AllLayers())),
        ("*.mlp", ast.BlockSite(ast.AllLayers(), "mlp")),
        ("h.{1, N-1}", ast.BlockSite(ast.LayerSet((ast.Index(1), ast.NIndex(-1))))),
        ("{0, 2..3,}", ast.BlockSite(ast.LayerSet((ast.Index(0), ast.LayerRange(ast.Index(2), ast.Index(3)))))),
        ("transformer.h.6", ast.BlockSite(ast.Index(6), container=("transformer", "h"))),
        ("model.layers.6.mlp", ast.BlockSite(ast.Index(6), "mlp", container=("model", "layers"))),
        ("model.layers.6.self_attn.o_proj",
         ast.BlockSite(ast.Index(6), "module", ("self_attn", "o_proj"), ("model", "layers"))),
        ("embed", ast.NamedSite("embed")),
        ("final", ast.NamedSite("final")),
        ('"transformer.h.6.mlp"', ast.ModuleSite("transformer.h.6.mlp")),
        ("transformer.ln_f", ast.ModuleSite("transformer.ln_f")),
        ('"odd \\"name\\" \\\\ path"', ast.ModuleSite('odd "name" \\ path')),
        ("h.6[-1]", ast.BlockSite(ast.Index(6), positions=ast.Positions("last"))),
        ("h.6[last]", ast.BlockSite(ast.Index(6), positions=ast.Positions("last"))),
        ("h.6[prompt]", ast.BlockSite(ast.Index(6), positions=ast.Positions("prompt"))),
        ("h.6[new]", ast.BlockSite(ast.Index(6), positions=ast.Positions("new"))),
        ("h.6[3]", ast.BlockSite(ast.Index(6), positions=ast.Positions("index", 3))),
        ("h.6[0:3]", ast.BlockSite(ast.Index(6), positions=ast.Positions("slice", 0, 3))),
        ("h.6[2:]", ast.BlockSite(ast.Index(6), positions=ast.Positions("slice", 2, None))),
        ("h.6[:4]", ast.BlockSite(ast.Index(6), positions=ast.Positions("slice", None, 4))),
        ("embed[last]", ast.NamedSite("embed", ast.Positions("last"))),
        ('"a.b"[1]', ast.ModuleSite("a.b", ast.Positions("index", 1))),
    ],
)
def test_sites(text, expected):
    assert site(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("scale 0.9", ast.Scale(0.9)),
        ("scale -2", ast.Scale(-2.0)),
        ("scale 1e-3", ast.Scale(0.001)),
        ("scale +1.5E+2", ast.Scale(150.0)),
        ("add steer", ast.Add(ast.BoundValue("steer"))),
        ('add "steer.safetensors" * 4.0', ast.Add(ast.FileValue("steer.safetensors"), 4.0)),
        ('add "v.safetensors#honesty" * -1', ast.Add(ast.FileValue("v.safetensors", "honesty"), -1.0)),
        ('add "notes#1.txt"', ast.Add(ast.FileValue("notes#1.txt"))),
        ("ablate refusal", ast.Ablate(ast.BoundValue("refusal"))),
        ('ablate "dir.pt"', ast.Ablate(ast.FileValue("dir.pt"))),
        ("zero", ast.Zero()),
        ("clamp -1 1", ast.Clamp(-1.0, 1.0)),
        ("noise 0.02", ast.Noise(0.02)),
        ("noise 0.02 always", ast.Noise(0.02, True)),
        ("module noise", ast.ModuleOp("noise")),
        ("module noise()", ast.ModuleOp("noise")),
        ("module noise(std=0.02)", ast.ModuleOp("noise", (("std", 0.02),))),
        ('module adapter(path="a.pt", train=true, bias=none,)',
         ast.ModuleOp("adapter", (("path", "a.pt"), ("train", True), ("bias", None)))),
        ("blade", ast.Blade()),
        ("blade gated", ast.Blade("gated")),
        ("blade identity", ast.Blade("identity")),
        ('blade gated from "reasoning.blade" alpha 0.2',
         ast.Blade("gated", ast.FileValue("reasoning.blade"), alpha=0.2)),
        ("blade gated alpha 0.5 project linear from src",
         ast.Blade("gated", ast.BoundValue("src"), "linear", 0.5)),
        ('blade identity from model "gpt2-large" project topk',
         ast.Blade("identity", ast.ModelSource("gpt2-large"), "topk")),
        ("debate average", ast.Debate("average")),
        ("debate confidence views dropout", ast.Debate("confidence", "dropout")),
        ("debate gated strength 0.3 views projection", ast.Debate("gated", "projection", 0.3)),
        ("debate gated views noise", ast.Debate("gated", "noise")),
        ("capture mlp_out", ast.Capture("mlp_out")),
        ("capture scale", ast.Capture("scale")),
    ],
)
def test_ops(text, expected):
    assert op(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("expect layers 12", ast.Expect("layers", 12)),
        ("expect hidden 768", ast.Expect("hidden", 768)),
        ('expect model "gpt2"', ast.Expect("model", "gpt2")),
    ],
)
def test_expect(text, expected):
    assert one(text) == expected


def test_file_structure_comments_separators_blank_lines():
    text = (
        "# steer GPT-2: damp block 6, then a gated blade near the top\n"
        "\n"
        "expect layers 12\n"
        "at h.6 scale 0.9   # trailing comment\n"
        "at h.4 scale 1.1; at h.8 scale 0.85;\n"
        "  ;;  \n"
        'at h.2 add "has;semicolon#and hash.pt"\n'
        "\tat N-4 blade gated\r\n"
    )
    spec = garage.parse(text, filename="steer.garage")
    assert spec.filename == "steer.garage"
    assert [type(s).__name__ for s in spec] == ["Expect", "At", "At", "At", "At", "At"]
    assert spec.statements[4].op == ast.Add(ast.FileValue("has;semicolon#and hash.pt"))
    assert spec.statements[5].op == ast.Blade("gated")


def test_empty_and_comment_only_specs():
    assert len(garage.parse("")) == 0
    assert len(garage.parse("# nothing here\n\n;\n")) == 0


def test_spans_point_at_source():
    spec = garage.parse("at h.1 zero\n  at h.6[last] scale 0.9; at N-4 blade gated", filename="f.garage")
    second, third = spec.statements[1], spec.statements[2]
    assert (second.span.line, second.span.column) == (2, 3)
    assert (second.site.span.line, second.site.span.column, second.site.span.end_column) == (2, 6, 15)
    assert (second.site.layers.span.column, second.site.positions.span.column) == (8, 9)
    assert (second.op.span.column, second.op.span.end_column) == (16, 25)
    assert (third.span.line, third.span.column, third.site.span.column) == (2, 27, 30)


def test_spans_do_not_affect_equality():
    assert garage.parse("at h.6 scale 0.9") == garage.parse("   at   layers.6.out   scale 0.90  # same")


def test_load_reads_a_file(tmp_path):
    path = tmp_path / "steer.garage"
    path.write_text("at h.6 scale 0.9\n", encoding="utf-8")
    spec = garage.load(path)
    assert spec.filename == str(path)
    assert spec.statements[0].op == ast.Scale(0.9)


def test_load_missing_file_is_a_spec_error(tmp_path):
    with pytest.raises(garage.SpecError) as err:
        garage.load(tmp_path / "nope.garage")
    assert "nope.garage: error: cannot read spec file" in str(err.value)


def test_grammar_ships_inside_the_package():
    from importlib import resources

    grammar = resources.files("garage.lang").joinpath("grammar", "garage.lark").read_text(encoding="utf-8")
    assert "at_stmt" in grammar
