"""`garage.train`: learn an injected model's own parameters from text, with the model frozen.

What learns: blade gates, `project linear` maps, and `add learn` vectors (every parameter of the injected
ops). The model's parameters never change: they are set not to require grad for the run (and restored
after), and the optimizer holds only the injected ones. The model stays in eval mode (no dropout), as the
injected graph was traced. The loss is next-token cross-entropy over the real tokens of each text, or over
a completion's tokens only for `{"prompt", "completion"}` examples. Every batch is padded (on the right)
to the same length, the longest example of the run, so that a compiled injected model sees one shape.

Ctrl-C stops cleanly: the history says it was interrupted, and the parameters keep what they learned.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, Union

import torch
from torch import nn

from .models import tokenizer_of
from .ops import Add, Blade, innermost
from .runtime.injected import InjectedModel
from .runtime.params import statement_key

IGNORE = -100  # labels that carry no loss
Example = tuple[list[int], list[int]]  # token ids, and their labels
Data = Sequence[Union[str, Mapping[str, str]]]


@dataclass
class Record:
    """One training step: its loss, the eval loss when it was measured, and each op's strength (a gated
    blade's mean gate σ(bias), a learned vector's norm F·‖v‖)."""

    step: int
    loss: float
    eval_loss: float | None
    strengths: dict[str, float]


@dataclass
class History:
    records: list[Record] = field(default_factory=list)
    interrupted: bool = False

    @property
    def losses(self) -> list[float]:
        return [r.loss for r in self.records]

    @property
    def eval_losses(self) -> list[float]:
        return [r.eval_loss for r in self.records if r.eval_loss is not None]


def read_examples(path: Path) -> list[str | dict[str, Any]]:
    """Training examples from a .txt file (one text a line) or a .jsonl file (one JSON object a line); a
    ValueError names the file, line and column of what is wrong."""
    if path.suffix not in (".txt", ".jsonl"):
        raise ValueError(f"{path}: training data is a .txt or .jsonl file")
    out: list[str | dict[str, Any]] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".txt":
            out.append(line)
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}:{err.colno}: not JSON ({err.msg}); write one object a line") from None
        if not isinstance(item, dict):
            raise ValueError(f"{path}:{number}: expected an object such as {{\"text\": …}}, not {type(item).__name__}")
        out.append(item)
    return out


def examples(data: Data, tokenizer: Any, max_length: int) -> list[Example]:
    """Token ids and labels: every token of a text learns; of a prompt + completion, only the completion."""
    out = []
    for item in data:
        if isinstance(item, str) or "text" in item:
            ids = tokenizer(item if isinstance(item, str) else item["text"])["input_ids"][:max_length]
            labels = list(ids)
        elif "prompt" in item and "completion" in item:
            prompt = tokenizer(item["prompt"])["input_ids"]
            completion = tokenizer(item["completion"], add_special_tokens=False)["input_ids"]
            ids = (prompt + completion)[:max_length]
            labels = ([IGNORE] * len(prompt) + completion)[:max_length]
        else:
            raise ValueError(f"a training example is a text, {{'text': …}} or {{'prompt': …, 'completion': …}}, "
                             f"not {sorted(item)}")
        if sum(label != IGNORE for label in labels[1:]) > 0:
            out.append((list(ids), labels))
    if not out:
        raise ValueError("no training example has a token to learn (texts need two tokens or more)")
    return out


def batch(chosen: Sequence[Example], length: int, pad: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """ids, attention mask and labels, right-padded to `length`."""
    ids = torch.full((len(chosen), length), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE)
    for row, (tokens, targets) in enumerate(chosen):
        ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, : len(tokens)] = 1
        labels[row, : len(targets)] = torch.tensor(targets)
    return ids.to(device), mask.to(device), labels.to(device)


def lm_loss(inj: InjectedModel, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each next token that carries a label."""
    logits = inj(input_ids=ids, attention_mask=mask).logits[:, :-1]
    return nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE)


@torch.no_grad()
def strengths(inj: InjectedModel) -> dict[str, float]:
    """How open each gate is, and how long each learned vector is, by statement and site."""
    out = {}
    for step, op in zip(inj.plan, inj.ops):
        inner, key = innermost(op), statement_key(step)
        if isinstance(inner, Blade) and inner.method == "gated":
            out[key] = torch.sigmoid(inner.gate.bias).mean().item()
        elif isinstance(inner, Add) and isinstance(inner.vector, nn.Parameter):
            out[key] = (inner.factor * inner.vector).detach().norm().item()
    return out


@torch.no_grad()
def evaluate(inj: InjectedModel, data: Sequence[Example], length: int, pad: int, batch_size: int) -> float:
    """Mean loss per labelled token over the data."""
    device = next(inj.model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(data), batch_size):
        ids, mask, labels = batch(data[start:start + batch_size], length, pad, device)
        n = int((labels[:, 1:] != IGNORE).sum())
        total += float(lm_loss(inj, ids, mask, labels)) * n
        count += n
    return total / max(count, 1)


def train(inj: InjectedModel, data: Data, *, steps: int = 100, lr: float = 1e-2, batch_size: int = 8,
          max_length: int = 128, eval_data: Data | None = None, objective: str = "lm", seed: int = 0,
          tokenizer: Any = None, eval_every: int = 10, on_step: Callable[[Record], None] | None = None) -> History:
    """Train the injected parameters for `steps` AdamW steps on random batches of `data` (seeded); the
    eval loss is measured every `eval_every` steps and at the end. The tokenizer defaults to the one garage
    loaded with the model. Returns the history, one record a step."""
    if objective != "lm":
        raise ValueError(f"objective is 'lm' (next-token loss), not {objective!r}")
    trainable = [p for p in inj.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("this spec has nothing to train: no gated blade, `project linear` or `add learn`")
    tokenizer = tokenizer if tokenizer is not None else tokenizer_of(inj.model)
    if tokenizer is None:
        raise ValueError("garage does not know this model's tokenizer: pass tokenizer=")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    train_set = examples(data, tokenizer, max_length)
    eval_set = examples(eval_data, tokenizer, max_length) if eval_data else []
    length = max(len(ids) for ids, _ in train_set + eval_set)
    device = next(inj.model.parameters()).device
    frozen = [(p, p.requires_grad) for p in inj.model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    history = History()
    try:
        for step in range(1, steps + 1):
            chosen = [train_set[i] for i in torch.randint(len(train_set), (batch_size,), generator=generator)]
            loss = lm_loss(inj, *batch(chosen, length, pad, device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            measured = eval_set and (step % eval_every == 0 or step == steps)
            eval_loss = evaluate(inj, eval_set, length, pad, batch_size) if measured else None
            history.records.append(Record(step, loss.item(), eval_loss, strengths(inj)))
            if on_step is not None:
                on_step(history.records[-1])
    except KeyboardInterrupt:
        history.interrupted = True
    finally:
        for p, requires_grad in frozen:
            p.requires_grad_(requires_grad)
    return history
