"""Every error names file:line:col, says what was expected, and every error in a file is reported at once."""

import pytest

import garage
from garage.lang.diagnostics import Diagnostic, render


def errors(text: str) -> list[Diagnostic]:
    with pytest.raises(garage.SpecError) as err:
        garage.parse(text, filename="s.garage")
    assert isinstance(err.value, garage.GarageError)
    return err.value.diagnostics


def where(d: Diagnostic) -> tuple[int, int, int]:
    return (d.line, d.column, d.end_column)


@pytest.mark.parametrize(
    "text, pos, message, hint",
    [
        ("at h.6 scael 0.9", (1, 8, 13), "unknown op 'scael'", "did you mean 'scale'?"),
        ("at h.6 ablte v", (1, 8, 13), "unknown op 'ablte'", "did you mean 'ablate'?"),
        ("exepct layers 3", (1, 1, 7), "unknown statement 'exepct'", "did you mean 'expect'?"),
        ("expect layrs 3", (1, 8, 13), "unknown word 'layrs'", "did you mean 'layers'?"),
        ("at h.6 blade gated alhpa 3", (1, 20, 25), "unknown word 'alhpa'", "did you mean 'alpha'?"),
        ("at h.6 blade gatd", (1, 14, 18), "unknown word 'gatd'", "did you mean 'gated'?"),
        ("at h.6 debate gated views dropuot", (1, 27, 34), "unknown word 'dropuot'", "did you mean 'dropout'?"),
        ("at h.6 scale", (1, 13, 14), "incomplete statement: expected a number", None),
        ("at h.6 scale x", (1, 14, 15), "unexpected 'x'", "expected a number"),
        ("at h.6 scale 0.9 1", (1, 18, 19), "unexpected '1'", "expected 'when', the end of the statement"),
        ('at h.6 add "x.pt', (1, 12, 17), "unterminated string", 'close the string with "'),
        ("at h.6 $ zero", (1, 8, 9), "unexpected character '$'", None),
        ("at h.6[-2] zero", (1, 8, 10), "position -2 is not supported", "[last]"),
        ("at h.6[5:2] zero", (1, 8, 11), "empty position range [5:2]", None),
        ("at h.6 clamp 2 1", (1, 8, 17), "clamp bounds are reversed", "clamp LO HI"),
        ("at h.6 noise -1", (1, 8, 16), "noise std must be non-negative", None),
        ("at h.6 scale 1e999", (1, 14, 19), "number 1e999 is too large", None),
        ("at h.6 blade gated alpha 1 alpha 2", (1, 28, 35), "'alpha' is given twice", None),
        ("at h.6 module m(a=1, a=2)", (1, 22, 23), "argument 'a' is given twice", None),
        ("at h.6 module m(a=yes)", (1, 19, 22), "'yes' is not a value", None),
        ("at h zero", (1, 4, 5), "'h' needs a layer index", "h.6"),
        ("at 101% zero", (1, 4, 8), "101% is more than 100%", None),
        ("expect layers \"12\"", (1, 15, 19), "`expect layers` takes an integer", None),
        ("expect model gpt2", (1, 14, 18), "unexpected 'gpt2'", "a quoted string"),
    ],
)
def test_one_error(text, pos, message, hint):
    [d] = errors(text)
    assert d.severity == "error" and d.filename == "s.garage"
    assert where(d) == pos
    assert message in d.message
    if hint:
        assert hint in (d.hint or "")


def test_every_bad_statement_is_reported_once():
    text = (
        "at h.6 scael 0.9\n"  # 1: unknown op
        "at h.2 scale 0.5\n"  # fine
        "at h.6 scale; at h.1 zero\n"  # 3: incomplete, then a fine statement on the same line
        "\n"
        "exepct layers 12   # comment\n"  # 5
        'at h.3 add "open; at h.4 zero\n'  # 6: unterminated string swallows the rest of its line
        "at h.6 blade gated alhpa 2; at h.6 clamp 3 1\n"  # 7: two errors on one line
    )
    diags = errors(text)
    assert [(d.line, d.column) for d in diags] == [(1, 8), (3, 13), (5, 1), (6, 12), (7, 20), (7, 36)]


def test_rendering_is_compiler_style():
    [d] = errors("\n  at h.6 scael 0.9")
    assert d.render() == (
        "s.garage:2:10: error: unknown op 'scael'\n"
        "    at h.6 scael 0.9\n"
        "           ^^^^^\n"
        "  hint: did you mean 'scale'? (expected 'ablate', 'add', 'bias', 'blade', 'capture', 'clamp', 'debate', "
        "'force', 'mask', 'module', 'noise', 'patch', 'sae', 'scale', 'zero')"
    )


def test_error_str_renders_all_with_count():
    with pytest.raises(garage.SpecError) as err:
        garage.parse("at h.6 scael 1\nat h.1 zoro", filename="two.garage")
    text = str(err.value)
    assert text.startswith("two.garage:1:8: error: unknown op 'scael'")
    assert "two.garage:2:8: error: unknown op 'zoro'" in text
    assert text.endswith("2 errors")


def test_default_filename_and_render_of_nothing():
    with pytest.raises(garage.SpecError) as err:
        garage.parse("at h.6 zoro")
    assert str(err.value).startswith("<spec>:1:8: error:")
    assert render([]) == "no problems found"


def test_error_types_form_one_family():
    assert issubclass(garage.SpecError, garage.GarageError)
    assert issubclass(garage.ResolveError, garage.GarageError)
    assert issubclass(garage.ValidationError, garage.GarageError)


def test_non_text_input_is_a_type_error():
    with pytest.raises(TypeError):
        garage.parse(b"at h.6 zero")
