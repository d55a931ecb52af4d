from __future__ import annotations

import torch
from torch import nn

from .wrapper import Wrapper, takes_positions


def last_columns(t: torch.Tensor, count: int) -> torch.Tensor:
    """The last `count` columns of [batch, length] `t` (the mask is longer than h under hooks in model.generate).

    A slice from length − count, not from −count: Inductor before torch 2.13 cannot lower a negative start
    over a dynamic size (`KeyError: 'unbacked_bindings'`, seen on torch 2.11), while here the start is 0."""
    return t.narrow(1, t.shape[1] - count, count)


def token_positions(h: torch.Tensor, attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                    input_ids: torch.Tensor | None = None, prompt_length: torch.Tensor | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """[batch, seq] absolute positions of h's tokens and whether each is real (not padding).

    Absolute positions come from `position_ids` where the graph has them (the generation steps), else from
    `cumsum(attention_mask) - 1`: counted from the first real token, also under left padding."""
    rows = next((t.shape[0] for t in (input_ids, attention_mask, position_ids, prompt_length) if t is not None), 1)
    batch = h.shape[0] if h.dim() == 3 else rows  # OPT's MLP and routers flatten h to [batch*seq, width]
    seq = h.shape[1] if h.dim() == 3 else h.shape[0] // batch
    if position_ids is not None:
        pos = position_ids.expand(batch, seq)
    elif attention_mask is not None:
        pos = last_columns(attention_mask.to(torch.long).cumsum(-1) - 1, seq)
    else:
        pos = torch.arange(seq, device=h.device).expand(batch, seq)
    if attention_mask is not None:
        real = last_columns(attention_mask, seq).bool()
    else:
        real = torch.ones(batch, seq, dtype=torch.bool, device=h.device)
    return pos, real


class AtPositions(Wrapper):
    """Applies `inner` at some sequence positions only; the others pass through unchanged.

    Positions are absolute: counted from the first real (unpadded) token of the prompt, which is what
    `cumsum(attention_mask) - 1` gives, also for left-padded batches. `[last]` is the last position of
    each forward call. `prompt_length` (per row) separates `[prompt]` from `[new]` during generation;
    without it every position is a prompt position. A capture at positions records the full-shape
    tensor with the other positions zeroed.
    """

    takes_positions = True

    def __init__(self, inner: nn.Module, kind: str, start: int | None = None, stop: int | None = None) -> None:
        super().__init__()
        self.inner = inner
        self.kind, self.start, self.stop = kind, start, stop

    def selected(
        self,
        h: torch.Tensor,
        attention_mask: torch.Tensor | None,
        prompt_length: torch.Tensor | None,
        position_ids: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """A [batch, seq] bool mask of the positions this op touches.

        Absolute positions come from `position_ids` where the graph has them (the generation steps), else
        from `cumsum(attention_mask) - 1`. Padding is read from the mask when it is aligned with h.
        """
        pos, real = token_positions(h, attention_mask, position_ids, input_ids, prompt_length)
        batch, seq = pos.shape
        if self.kind == "last":
            return torch.arange(seq, device=h.device).expand(batch, seq) == seq - 1
        if self.kind in ("prompt", "new"):
            in_prompt = real if prompt_length is None else pos < prompt_length.reshape(-1, 1)
            return (in_prompt if self.kind == "prompt" else ~in_prompt) & real
        start = self.start if self.start is not None else 0
        stop = start + 1 if self.kind == "index" else self.stop
        sel = real & (pos >= start)
        return sel if stop is None else sel & (pos < stop)

    def forward(
        self,
        h: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        prompt_length: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        sel = self.selected(h, attention_mask, prompt_length, position_ids, input_ids).reshape(*h.shape[:-1], 1)
        if self.observes_only:  # a capture keeps the selected positions, zeros elsewhere, full shape
            if getattr(self.inner, "selects_itself", False):  # it records something else than h (SAE features)
                self.inner(h, sel)
            else:
                self.inner(torch.where(sel, h, torch.zeros_like(h)))
            return h
        positional = takes_positions(self.inner)
        inner = self.inner(h, attention_mask, prompt_length, position_ids, input_ids) if positional else self.inner(h)
        return torch.where(sel, inner, h)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, start={self.start}, stop={self.stop}"
