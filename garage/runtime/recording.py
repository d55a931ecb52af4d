"""Captures during generation: every forward call's values, joined along the sequence.

A `capture` op keeps its last call's value (`ops.Capture`), which is what a plain call wants. Generation
calls the model once for the prompt, then once for each token fed back; a `Recording` takes each call's
values out of the captures after that call and joins them when generation ends. It runs between calls,
outside any graph: a list growing inside a compiled step graph would make it recompile at every token.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..ops import AtPositions, Capture, innermost


def kept_columns(module: nn.Module, prompt_tokens: int) -> tuple[int, int | None]:
    """The columns (start, stop) of the generated sequence, prompt then each fed token, that a capture keeps.

    `[new]` and `[last]` select whole columns during generation (the same in every row, also under left
    padding), so only those are kept: `[new]` the fed generated tokens, `[last]` the prompt's last token
    then the generated ones (the state each new token was chosen from). `[prompt]` keeps the prompt.
    Elsewhere every column is kept, zero where the positions do not select (as in a plain call)."""
    kind = module.kind if isinstance(module, AtPositions) else None
    if kind == "new":
        return prompt_tokens, None
    if kind == "last":
        return prompt_tokens - 1, None
    if kind == "prompt":
        return 0, prompt_tokens
    return 0, None


class Recording:
    """Each call's captured values during one generation, kept per capture name, joined by `finish()`."""

    def __init__(self, store: dict[str, torch.Tensor], modules: Iterable[nn.Module], prompt_tokens: int) -> None:
        self.store = store
        self.keep: dict[str, tuple[int, int | None]] = {}  # a later capture of the same name wins, as in a call
        for module in modules:
            capture = innermost(module)
            if isinstance(capture, Capture):
                self.keep[capture.key] = kept_columns(module, prompt_tokens)
        self.calls: dict[str, list[torch.Tensor]] = {}
        self.column = 0  # where the next call's tokens start in the generated sequence
        self.tokens = prompt_tokens  # how many tokens the next call runs: the prompt, then one a call

    def called(self) -> None:
        """After each forward call: take its values out of the captures, keeping their kept columns.

        A flattened value ([batch × tokens, width]: routers, OPT's MLP) is made [batch, tokens, width]
        first, so that every value joins along dim 1. The copy frees the rest of the prompt's value and
        keeps what CUDA graphs (compile mode "reduce-overhead") would overwrite on the next step."""
        for key, (start, stop) in self.keep.items():
            value = self.store.pop(key, None)
            if value is None:
                continue
            if value.dim() == 2:
                value = value.unflatten(0, (-1, self.tokens))
            end = None if stop is None else max(stop - self.column, 0)
            self.calls.setdefault(key, []).append(value[:, max(start - self.column, 0):end].clone())
        self.column += self.tokens
        self.tokens = 1

    def finish(self) -> None:
        """Put each capture's joined values in the store: [batch, kept columns, ...]."""
        for key, calls in self.calls.items():
            self.store[key] = torch.cat(calls, dim=1)


@contextmanager
def recording(store: dict[str, torch.Tensor], modules: Iterable[nn.Module], prompt_tokens: int) -> Iterator[Recording]:
    """Captures accumulate over the forward calls of the block (the body calls `called()` after each);
    on exit, `store` holds them joined, also when generation stopped with an error."""
    record = Recording(store, modules, prompt_tokens)
    try:
        yield record
    finally:
        record.finish()
