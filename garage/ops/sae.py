from __future__ import annotations

import torch

from ..sae import SAE
from .base import Op
from .capture import Capture

ACTIONS = ("add", "clamp", "zero", "scale")


class SaeFeatures(Op):
    """h ← h + Σ_f c_f · d_f over the chosen features f, with d_f feature f's decoder direction (what one unit
    of its activation adds to the SAE's decode: W_dec[f]) and a = encode(h):

        add X    c_f = X                  the direction, X times
        clamp X  c_f = X − a_f(h)         the feature's activation set to X
        zero     c_f = −a_f(h)            the feature's activation set to 0
        scale X  c_f = (X − 1)·a_f(h)     the feature's activation multiplied by X

    Since decode is linear, h + (a'_f − a_f)·d_f = decode(a') + (h − decode(a)): the edited reconstruction
    plus the SAE's reconstruction error, so whatever the SAE does not explain passes through unchanged.
    The SAE is a submodule, so its tensors are this op's buffers; X is a buffer too.
    """

    index: torch.Tensor
    amount: torch.Tensor

    def __init__(self, sae: SAE, features: tuple[int, ...], action: str, amount: float | None = None) -> None:
        super().__init__()
        if action not in ACTIONS:
            raise ValueError(f"unknown SAE action {action!r}: one of {', '.join(ACTIONS)}")
        self.sae, self.action, self.features = sae, action, tuple(features)
        self.register_buffer("index", torch.tensor(self.features, dtype=torch.long), persistent=False)
        self.scalar("amount", 0.0 if amount is None else amount)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        directions = self.sae.directions(self.index)  # [k, d_in]
        if self.action == "add":
            return h + self.amount * directions.sum(0)
        acts = self.sae.encode_features(h, self.index)  # [..., k]
        if self.action == "clamp":
            change = self.amount - acts
        elif self.action == "scale":
            change = (self.amount - 1) * acts
        else:
            change = -acts
        return h + change @ directions

    def extra_repr(self) -> str:
        return f"{self.action}, features={list(self.features)}, " + super().extra_repr()


class SaeCapture(Capture):
    """h unchanged; the SAE's feature activations encode(h), [..., d_sae], are kept in `store[key]`.

    At positions, the wrapper passes the positions it selects (`keep`) instead of zeroing h first, since the
    encoding of a zero state is not zero: the activations are zeroed outside the selection instead."""

    selects_itself = True

    def __init__(self, store: dict[str, torch.Tensor], key: str, sae: SAE) -> None:
        super().__init__(store, key)
        self.sae = sae

    def forward(self, h: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        acts = self.sae.encode(h)
        self.store[self.key] = (acts if keep is None else torch.where(keep, acts, torch.zeros_like(acts))).detach()
        return h
