"""Steering curves: what a strength buys, and what it costs, measured over a range of coefficients.

One statement's strength (the `* F` of `add`, `scale`'s factor, a blade's `alpha`, a debate's `strength`,
`noise`'s std, `patch`'s `mix`, an SAE edit's X) lives in a buffer of its op, so a sweep compiles the spec once and sets the
buffer for each coefficient: no retrace, no recompile. At each coefficient it measures
- the effect: by default the log-probability gap of two word sets as the next word after some prompts
  (mean over prompts of mean log p(good) − mean log p(bad), each word's first token);
- the damage: the perplexity of a held-out text, and the KL divergence KL(plain ‖ steered) of the
  next-token distributions at every real token of neutral prompts (mean over tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from .compiler import SpecLike
from .compiler import compile as compile_spec
from .lang import spec as ast
from .models import first_token, tokenizer_of
from .ops import innermost
from .runtime.injected import InjectedModel

# Which buffer holds each op's strength (by AST node: `bias {…} * F` is an Add op of its own; an SAE edit's X).
STRENGTH = {ast.Add: "factor", ast.Learn: "factor", ast.Bias: "factor", ast.Scale: "factor", ast.Blade: "alpha",
            ast.Debate: "strength", ast.Noise: "std", ast.Patch: "mix", ast.SaeFeatures: "amount"}
EFFECT_PROMPTS = ("My day today was", "The movie I saw last night was", "When I think about my family, I feel",
                  "The food at that restaurant was", "Honestly, this weather makes me", "My new job is")
GOOD, BAD = ("happy", "love", "great"), ("sad", "hate", "awful")
NEUTRAL_PROMPTS = ("The capital of France is", "Water boils at a temperature of", "The train leaves the station at",
                   "To make bread, you need flour, water and")
HELD_OUT_TEXT = ("The river runs through the old town, past the market and the church, and under three stone "
                 "bridges. In spring the water is high, and children watch the boats from the banks. In the "
                 "evening the lights come on along the quay, and people walk there after dinner.")
Measure = Callable[[nn.Module], float]  # a model (plain or injected) → one number


@dataclass(frozen=True)
class StrengthSweep:
    """Per coefficient: the effect, the perplexity of the held-out text, and the KL from the plain model."""

    statement: str
    coefficients: list[float]
    effect: list[float]
    perplexity: list[float]
    kl: list[float]

    def as_dict(self) -> dict[str, Any]:
        return {"statement": self.statement, "coefficients": self.coefficients, "effect": self.effect,
                "perplexity": self.perplexity, "kl": self.kl}

    def __str__(self) -> str:
        lines = [f"{'coefficient':>11}  {'effect':>9}  {'perplexity':>10}  {'KL':>9}"]
        lines += [f"{c:>11g}  {e:>9.4f}  {p:>10.3f}  {k:>9.5f}"
                  for c, e, p, k in zip(self.coefficients, self.effect, self.perplexity, self.kl)]
        return "\n".join(lines)


def _batch(tokenizer: Any, texts: Sequence[str], device: torch.device) -> dict[str, torch.Tensor]:
    """Texts as a left-padded batch, so that the last column is every row's last real token."""
    side = getattr(tokenizer, "padding_side", "right")
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer(list(texts), return_tensors="pt", padding=len(texts) > 1)
    finally:
        tokenizer.padding_side = side
    return {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}


def word_gap(tokenizer: Any, prompts: Sequence[str] = EFFECT_PROMPTS, good: Sequence[str] = GOOD,
             bad: Sequence[str] = BAD) -> Measure:
    """The default effect: mean over prompts of mean log p(good) − mean log p(bad) for the next word."""
    good_ids, bad_ids = ([first_token(tokenizer, " " + word) for word in words] for words in (good, bad))

    @torch.no_grad()
    def measure(model: nn.Module) -> float:
        batch = _batch(tokenizer, prompts, _device(model))
        logprobs = model(**batch).logits[:, -1].float().log_softmax(-1)
        return float((logprobs[:, good_ids].mean(-1) - logprobs[:, bad_ids].mean(-1)).mean())
    return measure


def perplexity(tokenizer: Any, text: str = HELD_OUT_TEXT) -> Measure:
    """exp(mean next-token negative log-likelihood) of a held-out text."""
    @torch.no_grad()
    def measure(model: nn.Module) -> float:
        batch = _batch(tokenizer, [text], _device(model))
        logprobs = model(**batch).logits[:, :-1].float().log_softmax(-1)
        nll = -logprobs.gather(-1, batch["input_ids"][:, 1:, None]).mean()
        return math.exp(float(nll))
    return measure


def _device(model: nn.Module) -> torch.device:
    """Where the model's inputs go (an injected model's own parameters may be none: its model's)."""
    inner = model.model if isinstance(model, InjectedModel) else model
    return next(inner.parameters()).device


@torch.no_grad()
def kl_from(plain: nn.Module, tokenizer: Any, prompts: Sequence[str] = NEUTRAL_PROMPTS) -> Measure:
    """KL(plain ‖ steered) of the next-token distributions, mean over every real token of the prompts."""
    batch = _batch(tokenizer, prompts, _device(plain))
    reference = plain(**batch).logits.float().log_softmax(-1)
    real = batch["attention_mask"].bool()

    @torch.no_grad()
    def measure(model: nn.Module) -> float:
        steered = model(**batch).logits.float().log_softmax(-1)
        kl = (reference.exp() * (reference - steered)).sum(-1)
        return float(kl[real].mean())
    return measure


def strength_ops(inj: InjectedModel, statement: int | None) -> tuple[str, list[torch.Tensor]]:
    """The strength buffers of one statement (by line; default: the only statement with a strength)."""
    found: dict[int, tuple[str, list[torch.Tensor]]] = {}
    for step, op in zip(inj.plan, inj.ops):
        name = STRENGTH.get(type(step.op))
        if isinstance(step.op, ast.SaeFeatures) and step.op.action == "zero":
            name = None  # `zero` has no X
        buffer = getattr(innermost(op), name, None) if name else None
        if isinstance(buffer, torch.Tensor):
            label = f"{step.span.line}:{step.span.column} {step.op.keyword} ({name})"
            found.setdefault(step.span.line, (label, []))[1].append(buffer)
    if statement is not None:
        if statement not in found:
            raise ValueError(f"line {statement} has no statement with a strength; lines with one: "
                             f"{', '.join(map(str, found)) or 'none'}")
        return found[statement]
    if len(found) != 1:
        raise ValueError(f"the spec has {len(found)} statements with a strength "
                         f"({', '.join(label for label, _ in found.values()) or 'none'}): choose one with statement=LINE")
    return next(iter(found.values()))


def strength_sweep(model: nn.Module, spec: SpecLike, coefficients: Sequence[float], tokenizer: Any = None,
                   bind: Mapping[str, object] | None = None, statement: int | None = None,
                   effect: Measure | None = None, good: Sequence[str] = GOOD, bad: Sequence[str] = BAD,
                   prompts: Sequence[str] = EFFECT_PROMPTS, text: str = HELD_OUT_TEXT,
                   neutral: Sequence[str] = NEUTRAL_PROMPTS) -> StrengthSweep:
    """Set one statement's strength to each coefficient in turn (the spec is compiled once) and measure the
    effect (default: `word_gap` of `good` and `bad` after `prompts`), the perplexity of `text` and the KL
    from the plain model on `neutral`. `statement` is a line number, needed when several statements have a
    strength; every site of that statement gets the coefficient."""
    tokenizer = tokenizer or tokenizer_of(model)
    if tokenizer is None:
        raise ValueError("a steering sweep reads text: pass tokenizer=")
    if not coefficients:
        raise ValueError("give at least one coefficient")
    inj = compile_spec(model, spec, bind)
    label, buffers = strength_ops(inj, statement)
    effect = effect or word_gap(tokenizer, prompts, good, bad)
    ppl, kl = perplexity(tokenizer, text), kl_from(model, tokenizer, neutral)
    saved = [b.clone() for b in buffers]
    rows: list[tuple[float, float, float]] = []
    try:
        for c in coefficients:
            for b in buffers:
                b.fill_(float(c))
            rows.append((effect(inj), ppl(inj), kl(inj)))
    finally:
        for b, old in zip(buffers, saved):
            b.copy_(old)
    effects, perplexities, kls = (list(column) for column in zip(*rows))
    return StrengthSweep(label, [float(c) for c in coefficients], effects, perplexities, kls)


def coefficient_range(text: str) -> list[float]:
    """`-8..8:1` (inclusive, step 1), `0..2:0.5`, or a comma list `-4,0,4`."""
    try:
        if ".." not in text:
            return [float(part) for part in text.split(",") if part.strip()]
        span, _, step_text = text.partition(":")
        low, high = (float(x) for x in span.split(".."))
        step = float(step_text) if step_text else 1.0
    except ValueError:
        raise ValueError(f"coefficients {text!r}: write LO..HI:STEP (e.g. -8..8:1) or a list (-4,0,4)") from None
    if step <= 0 or high < low:
        raise ValueError(f"coefficients {text!r}: the step must be positive and HI at least LO")
    count = int(math.floor((high - low) / step + 1e-9)) + 1
    return [round(low + i * step, 10) for i in range(count)]
