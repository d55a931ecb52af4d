"""Grammar-driven fuzzing: 20,000 generated and mutated specs. Every one either parses (and resolves, or
fails to resolve with diagnostics) or raises a GarageError whose every diagnostic points inside the text.
Anything else (another exception, a span outside the text) is a bug."""

from __future__ import annotations

import random
import time

import pytest
from zoo import tiny_model

import garage

WORDS = [
    "at", "h", "layer", "blocks", ".", "N", "-", "+", "4", "0", "11", "-1", "87.5%", "100%", "0.00001%", "*", "..",
    "{", "}", ",", "[", "]", "last", "prompt", "new", ":", "embed", "final", "in", "out", "attn", "mlp",
    "scale", "0.9", "1e-3", "-2.5", "add", "v", '"v.pt"', '"w.safetensors#k"', "ablate", "zero", "clamp",
    "noise", "always", "module", "noise(std=0.1)", "(", ")", "=", "true", "none", "blade", "gated", "identity",
    "from", "model", '"gpt2"', "project", "topk", "linear", "alpha", "debate", "average", "confidence",
    "views", "dropout", "projection", "strength", "capture", "c", "expect", "layers", "hidden", "12",
    '"transformer.h.3.mlp"', "transformer", "#", ";", "\n", "\r\n", "\r", "\t", " ", '"', "\\", "é", "\ufeff",
    "\x0b", "\x0c", "\x85", "\u2028", "9999999999", "a." * 40,
]
VALID = [
    "at h.6 scale 0.9", "at N-4 blade gated", "at h.2..5 add v * 4.0", "at h.{1, N-1}.mlp capture m",
    "at h.*.attn scale 0.95", "at embed noise 0.02 always", 'at "transformer.h.3.mlp.c_fc" capture fc',
    "at h.6[last] add v", "at h.1[2:5] ablate v", "expect layers 12", 'expect model "gpt2"',
    "at 87.5% zero", "at h.-1 clamp -3 3", "at h.3 module noise(std=0.1)", "at h.3 debate gated views noise",
    "at h.8 blade identity from v alpha 0.2 project topk", "at final capture f", "at h.0.in scale 1.1",
]


def generated(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return "".join(rng.choice(WORDS) + rng.choice(("", " ", " ", " ")) for _ in range(rng.randint(1, 14)))
    text = list(rng.choice(("\n", ";", "; ")).join(rng.choice(VALID) for _ in range(rng.randint(1, 4))))
    for _ in range(rng.randint(0, 4)):  # mutate: delete, insert or replace a character
        where = rng.randrange(len(text) + 1)
        kind = rng.random()
        if kind < 0.33 and where < len(text):
            del text[where]
        elif kind < 0.66:
            text.insert(where, rng.choice(WORDS))
        elif where < len(text):
            text[where] = rng.choice(WORDS)
    return "".join(text)


def in_range(diagnostic: garage.Diagnostic, text: str) -> bool:
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if diagnostic.line == 0:
        return True  # about the whole spec (e.g. a file), not a place in it
    if not 1 <= diagnostic.line <= len(lines):
        return False
    width = len(lines[diagnostic.line - 1])
    return 1 <= diagnostic.column <= width + 1 and diagnostic.column < diagnostic.end_column <= width + 2


@pytest.fixture(scope="module")
def info() -> garage.ModelInfo:
    return garage.ModelInfo.from_model(tiny_model("gpt2"))


def test_twenty_thousand_specs_give_a_result_or_an_in_range_diagnostic(info):
    rng = random.Random(2026)
    start = time.perf_counter()
    parsed = 0
    for _ in range(20_000):
        text = generated(rng)
        try:
            spec = garage.parse(text)
            parsed += 1
            garage.resolve(spec, info)
        except garage.GarageError as err:
            assert err.diagnostics, repr(text)
            bad = [d for d in err.diagnostics if not in_range(d, text)]
            assert not bad, (text, bad)
            assert str(err)  # renders
    assert parsed > 2_000  # the generator reaches valid specs, not only errors
    assert time.perf_counter() - start < 60
