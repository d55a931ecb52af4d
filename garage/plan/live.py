"""`blade … from model "path-or-id"` / `from model NAME`: a live source model, checked and placed.

The source runs on the same tokens as the target, so the two must share a tokenizer: their vocabulary
sizes must agree, and so must a hash of their vocabularies whenever both tokenizers are known. Its state is
taken at the same kind of site as the blade's, at layer K: `layer K` when written, else the layer at the
same depth fraction as the target's (K = round(ℓ · N_source / N_target), so equal depths for equal
layer counts). The Same-Dimension rule applies: a source of another width needs `project linear`.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..lang import spec as ast
from ..lang.diagnostics import Problem
from ..lang.parse import parse_site
from ..models import shared_model, tokenizer_of, vocab_hash
from .archs import ModelInfo, text_config
from .build_ops import BuildContext, bind_hint
from .resolve import ConcreteSite, Step, concrete_sites

LIVE_KINDS = ("out", "in", "attn", "mlp")  # sites whose source counterpart is the same kind of site


def source_model(source: ast.ModelSource, ctx: BuildContext) -> nn.Module:
    """The bound model, or the model loaded from its name (once per process), on the target's device and dtype."""
    if source.bound:
        bound = ctx.bind.get(source.ref)
        if source.ref not in ctx.bind:
            raise Problem(source.span, f"'{source.ref}' is not bound", bind_hint(source.ref, ctx))
        if not isinstance(bound, nn.Module) or getattr(bound, "config", None) is None:
            raise Problem(source.span, f"'{source.ref}' is bound to a {type(bound).__name__}, not a Hugging Face model",
                          "bind the source model itself: bind={\"" + source.ref + "\": model}")
        return bound
    try:
        return shared_model(source.ref, str(ctx.device or "cpu"), ctx.dtype or torch.float32)
    except (OSError, ValueError) as err:
        raise Problem(source.span, f"cannot load source model {source.ref!r}: {err}",
                      "give a folder saved with save_pretrained, a cached hub id, or a built-in model") from None


def _name(model: nn.Module, written: str) -> str:
    path = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    return f"{written} ({type(model).__name__}{', ' + path if path and path != written else ''})"


def _check_tokens(source: nn.Module, target: nn.Module, span: ast.Span, written: str) -> None:
    """Source and target read the same token ids only if they share a vocabulary."""
    sizes = [getattr(text_config(m), "vocab_size", None) for m in (source, target)]
    problem = None
    if None not in sizes and sizes[0] != sizes[1]:
        problem = f"vocabularies of {sizes[0]} and {sizes[1]} tokens"
    else:
        tokenizers = [tokenizer_of(m) for m in (source, target)]
        if None not in tokenizers and vocab_hash(tokenizers[0]) != vocab_hash(tokenizers[1]):  # type: ignore[arg-type]
            problem = "tokenizers with different vocabularies"
    if problem:
        raise Problem(span, f"source model {_name(source, written)} and the target {type(target).__name__} have "
                      f"{problem}: the source would read the target's token ids as other tokens",
                      "take the source from the same model family (same tokenizer), or record a blade file "
                      "with garage blade extract and add it with `from \"file\"`")


def source_layer(op: ast.Blade, step: Step, target: ModelInfo, source: ModelInfo) -> int:
    """K: written, or the target layer's depth fraction on the source."""
    assert step.site.layer is not None
    if op.layer is None:
        return min(source.num_layers - 1, round(step.site.layer * source.num_layers / target.num_layers))
    if not 0 <= op.layer < source.num_layers:
        raise Problem(op.span, f"layer {op.layer} is out of range: the source model has {source.num_layers} blocks "
                      f"(0..{source.num_layers - 1})", f"choose a layer in 0..{source.num_layers - 1}")
    return op.layer


def source_site(op: ast.Blade, step: Step, target: ModelInfo, source: ModelInfo) -> ConcreteSite:
    """The source's site of the same kind as the blade's, at layer K."""
    kind = step.site.kind
    if kind not in LIVE_KINDS or step.site.layer is None:
        raise Problem(op.span, f"a live source blade goes at a block, h.I.in, attn or mlp site, not {step.site.label}",
                      "add it at a layer: at N-4 blade gated from model …")
    if step.site.positions is not None:
        raise Problem(op.span, "a live source blade acts at every token: the source runs on all of them",
                      f"write the site without positions: at h.{step.site.layer}")
    layer = source_layer(op, step, target, source)
    text = f"h.{layer}" if kind == "out" else f"h.{layer}.{kind}"
    try:
        return concrete_sites(source, parse_site(text)[0])[0]
    except Problem as problem:
        raise Problem(op.span, f"the source model has no {text}: {problem.message}", problem.hint) from None


def live_blade(step: Step, ctx: BuildContext, target_model: nn.Module, target: ModelInfo) -> nn.Module:
    """The blade op of a `from model` statement: its LiveSource holds the source model and site."""
    op = step.op
    assert isinstance(op, ast.Blade) and isinstance(op.source, ast.ModelSource) and op.method is not None
    model = source_model(op.source, ctx)
    _check_tokens(model, target_model, op.source.span, op.source.ref)
    try:
        info = ModelInfo.from_model(model)
    except (TypeError, ValueError) as err:
        raise Problem(op.source.span, f"garage cannot read the source model: {err}", "use a Hugging Face model") from None
    site = source_site(op, step, target, info)
    param = next(model.parameters())
    if (ctx.device is not None and param.device != ctx.device) or (ctx.dtype is not None and param.dtype != ctx.dtype):
        raise Problem(op.source.span, f"the source model is on {param.device} in {param.dtype}, the target on "
                      f"{ctx.device} in {ctx.dtype}: one graph runs both", "load both on one device in one dtype")
    width = site.width or info.hidden_size
    if width != ctx.hidden and op.project != "linear":
        raise Problem(op.source.span, f"the source's {site.label} has width {width}, but {ctx.width_name} is "
                      f"{ctx.hidden}", "source and target must share hidden dimensions (the Same-Dimension rule): "
                      "add `project linear` (a trainable projection)" +
                      (", since `project topk` needs indices chosen on calibration prompts, which a blade file "
                       "holds" if op.project == "topk" else ""))
    metadata = {"kind": "live", "name": op.source.ref, "model_type": info.model_type, "weights": info.fingerprint,
                "site": site.label, "layer": str(site.layer), "num_layers": str(info.num_layers),
                "depth": f"{(site.layer or 0) / info.num_layers:.4f}"}
    source = ops.LiveSource(model, site, width, ctx.hidden, op.project, metadata)
    return ops.Blade(source, ctx.hidden, op.method, op.alpha)


def is_live(step: Step) -> bool:
    """Whether a step is a blade from a live source model (built here, not by build_ops)."""
    return isinstance(step.op, ast.Blade) and isinstance(step.op.source, ast.ModelSource)
