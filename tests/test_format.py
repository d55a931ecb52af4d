"""The formatter prints canonical text; parse → format → parse is the identity (property-tested)."""

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import garage

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


# ------------------------------------------------------------------ golden canonical forms
@pytest.mark.parametrize(
    "text, canonical",
    [
        ("at 6 scale 0.90", "at h.6 scale 0.9"),
        ("at layers.6.out scale 2.0", "at h.6 scale 2"),
        ("at N - 4 blade   gated", "at h.N-4 blade gated"),
        ("at blocks.N+0 zero", "at h.N zero"),
        ("at 87.50% zero", "at h.87.5% zero"),
        ("at h.{ 1 ,N-1, } zero", "at h.{1, N-1} zero"),
        ("at *.mlp capture m", "at h.*.mlp capture m"),
        ("at h.-1[-1] zero", "at h.-1[last] zero"),
        ("at transformer.h.6.attn noise 1E-3 always", "at transformer.h.6.attn noise 0.001 always"),
        ("at transformer.ln_f zero", 'at "transformer.ln_f" zero'),
        ('at "a\\"b" zero', 'at "a\\"b" zero'),
        ("at h.1 module m()", "at h.1 module m"),
        ("at h.1 module m(a=1.0,b=\"x\",c=TRUE)", 'at h.1 module m(a=1, b="x", c=true)'),
        ('at h.1 add "v.pt#k"*+3', 'at h.1 add "v.pt#k" * 3'),
        ("at h.1 blade gated alpha 0.2 from src project linear",
         "at h.1 blade gated from src project linear alpha 0.2"),
        ("at h.1 debate gated strength 1 views noise", "at h.1 debate gated views noise strength 1"),
        ('expect model "gpt2"', 'expect model "gpt2"'),
        ("at h.1 scale 1e20", "at h.1 scale 1e+20"),
        ("at 0.001% zero", "at h.0.001% zero"),
        ("at h.3.attn.heads{ 5,1,2,3 ,3}[ last ] zero", "at h.3.attn.heads{1..3, 5}[last] zero"),
        ("at h.1.router bias{2,5}*8.0", "at h.1.router bias {2, 5} * 8"),
        ('at h.1.router bias "p.safetensors"', 'at h.1.router bias "p.safetensors"'),
        ("at h.1.router mask {1..2}", "at h.1.router mask {1, 2}"),
        ("at h.*.router force 03", "at h.*.router force 3"),
    ],
)
def test_canonical(text, canonical):
    assert garage.format(garage.parse(text)) == canonical + "\n"


def test_one_statement_a_line_keeping_comments_and_groups():
    spec = garage.parse("# c\nexpect layers 12; at h.1 zero\n\n\n   # indented\nat h.2 zero # x\n;\n\n")
    assert garage.format(spec) == "# c\nexpect layers 12\nat h.1 zero\n\n# indented\nat h.2 zero  # x\n"
    assert garage.format(garage.parse("")) == ""
    assert garage.format(garage.parse("# only a comment")) == "# only a comment\n"


def test_a_spec_built_in_python_formats_without_a_source():
    spec = garage.Spec(garage.parse("at h.1 zero; at h.2 scale 2").statements)
    assert garage.format(spec) == "at h.1 zero\nat h.2 scale 2\n"


def test_tiny_percentages_format_without_an_exponent():
    for text in ("at 0.00001% zero", "at 0.000000001% zero", "at 0.0000123% zero"):
        spec = garage.parse(text)
        assert "e" not in garage.format(spec).split()[1] and garage.parse(garage.format(spec)) == spec


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.garage")), ids=lambda p: p.name)
def test_every_example_is_canonical(path, capsys):
    from garage.cli import main

    assert main(["fmt", "--check", str(path)]) == 0


# ------------------------------------------------------------------ random valid specs
names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,6}", fullmatch=True).filter(
    lambda s: s not in {"true", "false", "none", "model", "N"}
)
ints = st.integers(0, 40).map(str)
numbers = st.one_of(
    ints,
    st.floats(0, 1e6).map(repr),
    st.sampled_from(["1e-3", "2E+5", "0.5", "10"]),
).flatmap(lambda n: st.sampled_from([n, "-" + n, "+" + n]))
strings = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=12).map(
    lambda s: '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'
)
index = st.one_of(
    ints, ints.map(lambda i: "-" + i), ints.map(lambda i: f"N-{i}"), ints.map(lambda i: f"N+{i}"), st.just("N"),
    st.floats(0, 100).map(lambda p: f"{p:.2f}%"),
    st.sampled_from(["0.00001%", "0.000000001%", "12.000001%"]),
)
item = st.one_of(index, st.tuples(index, index).map(lambda t: f"{t[0]}..{t[1]}"))
layers = st.one_of(item, st.just("*"), st.lists(item, min_size=1, max_size=3).map(lambda xs: "{" + ", ".join(xs) + "}"))
positions = st.one_of(
    st.just(""), st.sampled_from(["[last]", "[-1]", "[prompt]", "[new]", "[:]"]), ints.map(lambda i: f"[{i}]"),
    st.tuples(st.integers(0, 9), st.integers(10, 20)).map(lambda t: f"[{t[0]}:{t[1]}]"),
)
alias = st.sampled_from(["h.", "layer.", "layers.", "blocks.", "", "transformer.h.", "model.layers."])
component = st.sampled_from(["", ".out", ".in", ".attn", ".mlp", ".self_attn.o_proj", ".mlp.hidden", ".router"])
int_set = st.lists(st.one_of(ints, st.tuples(st.integers(0, 9), st.integers(9, 20)).map(lambda t: f"{t[0]}..{t[1]}")),
                   min_size=1, max_size=4).map(lambda xs: "{" + ", ".join(xs) + "}")
site = st.one_of(
    st.tuples(alias, layers, component, positions).map("".join),
    st.tuples(alias, layers, st.one_of(st.just(""), int_set), positions).map(lambda t: f"{t[0]}{t[1]}.attn.heads{t[2]}{t[3]}"),
    st.tuples(st.sampled_from(["embed", "final", "transformer.ln_f"]), positions).map("".join),
    st.tuples(strings, positions).map("".join),
)
value = st.one_of(names, strings)
kwarg_value = st.one_of(numbers, strings, st.sampled_from(["true", "false", "none"]))
op = st.one_of(
    numbers.map(lambda n: f"scale {n}"),
    st.tuples(value, st.one_of(st.just(""), numbers.map(lambda n: f" * {n}"))).map(lambda t: f"add {t[0]}{t[1]}"),
    value.map(lambda v: f"ablate {v}"),
    st.just("zero"),
    st.tuples(st.integers(-5, 0), st.integers(0, 5)).map(lambda t: f"clamp {t[0]} {t[1]}"),
    st.tuples(st.floats(0, 3), st.sampled_from(["", " always"])).map(lambda t: f"noise {t[0]!r}{t[1]}"),
    st.tuples(names, st.lists(st.tuples(names, kwarg_value), max_size=3, unique_by=lambda kv: kv[0])).map(
        lambda t: f"module {t[0]}" + ("(" + ", ".join(f"{k}={v}" for k, v in t[1]) + ")" if t[1] else "")
    ),
    st.tuples(
        st.sampled_from(["identity", "gated"]),
        st.permutations([
            st.one_of(st.just(""), value.map(lambda v: f" from {v}"), strings.map(lambda s: f" from model {s}")),
            st.sampled_from(["", " project topk", " project linear"]),
            st.one_of(st.just(""), numbers.map(lambda n: f" alpha {n}")),
        ]),
    ).flatmap(lambda t: st.tuples(*t[1]).map(lambda cl, m=t[0]: f"blade {m}" + "".join(cl))),
    st.just("blade"),
    st.tuples(
        st.sampled_from(["average", "confidence", "gated"]),
        st.sampled_from(["", " views dropout", " views noise", " views projection"]),
        st.one_of(st.just(""), numbers.map(lambda n: f" strength {n}")),
    ).map(lambda t: "debate " + "".join(t)),
    names.map(lambda n: f"capture {n}"),
    st.tuples(st.one_of(int_set, value), st.one_of(st.just(""), numbers.map(lambda n: f" * {n}"))).map(
        lambda t: f"bias {t[0]}{t[1]}"),
    int_set.map(lambda s: f"mask {s}"),
    ints.map(lambda i: f"force {i}"),
)
statement = st.one_of(
    st.tuples(site, op).map(lambda t: f"at {t[0]} {t[1]}"),
    st.sampled_from(["layers", "hidden"]).flatmap(lambda k: ints.map(lambda i: f"expect {k} {i}")),
    strings.map(lambda s: f"expect model {s}"),
)
separator = st.sampled_from(["\n", "; ", " ;\n", "  # comment\n", "\n\n"])
spec_text = st.lists(st.tuples(statement, separator), max_size=6).map(lambda xs: "".join(s + sep for s, sep in xs))


def parse_valid(text: str) -> garage.Spec | None:
    """Parse generated text; percentages over 100 and dropout rates outside [0, 1) are the generator's only
    invalid forms."""
    try:
        return garage.parse(text)
    except garage.SpecError as err:
        assert all("more than 100%" in d.message or "not a probability" in d.message for d in err.diagnostics), str(err)
        return None


@settings(max_examples=1_500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec_text)
def test_parse_format_parse_round_trips(text):
    spec = parse_valid(text)
    if spec is None:
        return
    canonical = garage.format(spec)
    again = garage.parse(canonical)
    assert again == spec
    assert garage.format(again) == canonical


def mutate(text: str, data) -> str:
    """Insert, delete or replace a few characters anywhere."""
    alphabet = st.sampled_from(list('ath.N-4%*{}[]:;#"\\ \n0123456789.,=()+e') + ["scale", "blade", "\t", "é"])
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(text)))
        kind = data.draw(st.sampled_from(["insert", "delete", "replace"]))
        piece = data.draw(alphabet)
        if kind == "insert":
            text = text[:i] + piece + text[i:]
        elif kind == "delete":
            text = text[:i] + text[i + 1:]
        else:
            text = text[:i] + piece + text[i + 1:]
    return text


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec_text, st.data())
def test_mutated_specs_raise_only_garage_errors(text, data):
    mutated = mutate(text, data)
    try:
        garage.parse(mutated)
    except garage.GarageError as err:
        for d in err.diagnostics:
            assert d.line >= 1 and d.column >= 1 and d.end_column > d.column
            assert d.render()


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_random_text_raises_only_garage_errors(text):
    try:
        garage.parse(text)
    except garage.GarageError:
        pass
