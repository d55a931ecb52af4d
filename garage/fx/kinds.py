"""The kinds of base graph garage traces from a model, as types.

Each kind knows the key it is cached under, how to export it, where the model sits in it (the prefix of
its module paths, and which graph inputs position-limited ops read), which use it serves, and what
stands in for it when torch.export cannot trace it (`instead`). `garage.fx.store` holds the graphs;
this module only describes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn
from torch.fx import GraphModule

from .._compat import fixes_dynamic_size
from .export import (
    EXAMPLE_BATCH,
    EXAMPLE_SEQ,
    SCORING_INPUTS,
    Signature,
    TraceFailure,
    export_scoring,
    is_encoder_decoder,
    scoring_signature,
)
from .rewrite import POSITION_INPUTS
from .seq2seq import export_decoder_step, export_encoder
from .steps import STEP_INPUTS, STEP_PREFIX, can_generate, export_step, export_unpadded

Shape = tuple[int, int]  # (batch, sequence length) of a call


@dataclass(frozen=True)
class GraphKind:
    """A base graph of a model. Subclasses set `use` ("scoring" or "generation") and where the model sits."""

    use: ClassVar[str] = "scoring"
    prefix: ClassVar[str] = ""  # the model's module paths in this graph start with it
    position_inputs: ClassVar[tuple[str | None, ...]] = POSITION_INPUTS  # what position-limited ops read
    stack: ClassVar[str] = ""  # an encoder–decoder model's stack the graph holds alone ("": every site's)

    @property
    def key(self) -> str:
        """The name this graph is cached under (with the model's fingerprint)."""
        raise NotImplementedError

    def export(self, model: nn.Module) -> GraphModule:
        """A fresh torch.export of this graph; a TraceFailure when the model cannot be traced for it."""
        raise NotImplementedError

    def instead(self, failure: TraceFailure, shape: Shape) -> GraphKind | None:
        """What stands in when this graph cannot be traced, for a call of this shape; None: forward hooks."""
        return None


@dataclass(frozen=True)
class Scoring(GraphKind):
    """Full-sequence scoring for these named inputs, batch and sequence length dynamic."""

    sig: Signature = SCORING_INPUTS

    @property
    def key(self) -> str:
        return repr(self.sig)

    def export(self, model: nn.Module) -> GraphModule:
        return export_scoring(model, self.sig)

    def instead(self, failure: TraceFailure, shape: Shape) -> GraphKind | None:
        """A model whose code fixes its sequence length (Mamba's, CPM-Ant's) is traced again per shape."""
        return Static(self.sig, *shape) if fixes_dynamic_size(failure) else None


@dataclass(frozen=True)
class Static(GraphKind):
    """The scoring graph of one input shape, for a model whose code fixes its sequence length."""

    sig: Signature = SCORING_INPUTS
    batch: int = EXAMPLE_BATCH
    seq: int = EXAMPLE_SEQ

    @property
    def key(self) -> str:
        return f"{self.sig!r}@{self.batch}x{self.seq}"

    def export(self, model: nn.Module) -> GraphModule:
        return export_scoring(model, self.sig, (self.batch, self.seq))


@dataclass(frozen=True)
class Unpadded(GraphKind):
    """Scoring of batches without padding, with no mask, so SDPA takes its causal kernels."""

    prefix: ClassVar[str] = STEP_PREFIX

    @property
    def key(self) -> str:
        return "unpadded"

    def export(self, model: nn.Module) -> GraphModule:
        return export_unpadded(model)

    def instead(self, failure: TraceFailure, shape: Shape) -> GraphKind | None:
        """The padded scoring graph serves unpadded batches too (with a mask of ones)."""
        return Scoring()


@dataclass(frozen=True)
class Step(GraphKind):
    """The generation step: new tokens over a preallocated KV cache, for the prompt and each new token."""

    use: ClassVar[str] = "generation"
    prefix: ClassVar[str] = STEP_PREFIX
    position_inputs: ClassVar[tuple[str | None, ...]] = STEP_INPUTS

    @property
    def key(self) -> str:
        return "step"

    def export(self, model: nn.Module) -> GraphModule:
        if is_encoder_decoder(model):
            raise TraceFailure(model, RuntimeError(
                "an encoder–decoder model generates through its own seq2seq loop, encoder then decoder, which the "
                "step graph, one decoder-only stack over its cache, does not hold"))
        return export_step(model)


@dataclass(frozen=True)
class Encode(GraphKind):
    """An encoder–decoder model's encoder, run once per generation (see `garage.fx.seq2seq`)."""

    use: ClassVar[str] = "generation"
    prefix: ClassVar[str] = STEP_PREFIX
    stack: ClassVar[str] = "encoder"

    @property
    def key(self) -> str:
        return "encode"

    def export(self, model: nn.Module) -> GraphModule:
        return export_encoder(model)


@dataclass(frozen=True)
class DecoderStep(GraphKind):
    """An encoder–decoder model's decoder step over both caches: the first step (which fills the
    cross-attention cache) or every later one (which reads it)."""

    first: bool = False
    use: ClassVar[str] = "generation"
    prefix: ClassVar[str] = STEP_PREFIX
    position_inputs: ClassVar[tuple[str | None, ...]] = STEP_INPUTS
    stack: ClassVar[str] = "decoder"

    @property
    def key(self) -> str:
        return "decoder-step-first" if self.first else "decoder-step"

    def export(self, model: nn.Module) -> GraphModule:
        return export_decoder_step(model, self.first)


def scoring_kind(model: nn.Module) -> Scoring:
    """The model's default scoring graph: ids and mask, or an encoder–decoder model's source and target."""
    return Scoring(scoring_signature(model))


def checked_kinds(model: nn.Module) -> list[GraphKind]:
    """The graphs a spec is checked on, in order of preference: for a causal LM the generation step (what
    `garage run` needs first, so that checking costs no extra export), else the scoring graph."""
    if can_generate(model) and not is_encoder_decoder(model):
        return [Step(), scoring_kind(model)]
    return [scoring_kind(model)]
