"""Where a model's blocks, attention, MLP, norms and projections live: found by discovery (`discover.py`),
with a table of overrides for the families it would get wrong, gathered in `ModelInfo` (one per stack of an
encoder–decoder model). Paths in a table row are relative to the base model (`transformer.` or `model.` is
found at run time, so one row serves GPT2Model and GPT2LMHeadModel alike).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from .discover import (
    TOP_K_NAMES,
    ArchRow,
    _discover,
    _experts,
    _find_blocks,
    _input_width,
    _is,
    _layer_counts,
    _output_width,
    _router_in,
    _stack_blocks,
    _stack_root,
)


_GEMMA_POST_NORM = ArchRow("layers", "post_attention_layernorm", "post_feedforward_layernorm", "norm",
                           "mlp.down_proj", "self_attn.o_proj")

# Overrides, for the families whose sublayers discovery would place wrongly; tests/test_architectures.py
# checks that each row still differs from what discovery finds, and still matches a hand-written hook.
ARCHS: dict[str, ArchRow] = {
    # Gemma 2/3 normalise each sublayer's output before the residual add: that norm's output is the site,
    # where discovery would take the attention and MLP modules themselves.
    "gemma2": _GEMMA_POST_NORM,
    "gemma3": _GEMMA_POST_NORM,
    "gemma3_text": _GEMMA_POST_NORM,
}

# Site kinds a family has no one value for, and why: refused when a spec names them (docs/architectures.md
# lists them). The rest of the family's sites work.
NO_SITE: dict[str, dict[str, str]] = {
    "reformer": {"in": "Reformer's reversible blocks take two residual streams and return two, so a block's input "
                       "is not one value; h.I is a block's first output stream, Y1 = X1 + attention(X2)"},
}


def model_config(model: nn.Module) -> Any:
    """The Hugging Face config of a model (typed Any: each family has its own config class)."""
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError("garage needs a Hugging Face model (a module with a .config)")
    return config


# Config fields that say where a model was loaded from or which version wrote it, not what it computes.
PROVENANCE_FIELDS = frozenset({"_name_or_path", "transformers_version"})


def config_hash(model: nn.Module) -> str:
    """A hash of the model's whole config, sub-configs included, leaving out PROVENANCE_FIELDS: the same model
    loaded from two places (a GGUF file and garage's copy of it) hashes the same."""
    config = model_config(model)
    text = config.to_json_string(use_diff=False) if hasattr(config, "to_json_string") else json.dumps(repr(config))

    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in PROVENANCE_FIELDS}
        return [strip(v) for v in value] if isinstance(value, list) else value

    return hashlib.sha256(json.dumps(strip(json.loads(text)), sort_keys=True).encode()).hexdigest()


def text_config(model: nn.Module) -> Any:
    """The config of the model's text part: the config itself for a text-only model."""
    config = model_config(model)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


@dataclass(frozen=True)
class ModelInfo:
    """What the resolver and compiler need to know about one model, with full module paths."""

    model_type: str
    num_layers: int
    hidden_size: int
    blocks: str  # e.g. "transformer.h"
    attn: str | None  # relative to a block, e.g. "attn"
    mlp: str | None
    final_norm: str | None  # full path, e.g. "transformer.ln_f"
    module_names: frozenset[str]
    from_table: bool = True
    down: str | None = None  # relative to a block: the FFN's down projection (see ArchRow)
    ffn_width: int | None = None  # the width of its input, `h.I.mlp.hidden`
    out_widths: Mapping[str, int] = field(default_factory=dict, hash=False)  # projections not hidden-wide out
    attn_out: str | None = None  # relative to a block: attention's output projection
    heads: int = 0  # attention heads (query heads under GQA); their outputs meet at attn_out's input
    head_width: int | None = None  # attn_out's input width: heads × head size
    router: str | None = None  # relative to a block: the MoE router (absent from a block with a dense MLP)
    experts: int = 0
    experts_per_token: int = 0  # top-k: how many experts each token is sent to
    fingerprint: str = ""  # a hash of some of the weights: equal for the same model, whatever its name
    attn_blocks: frozenset[int] = frozenset()  # the blocks that have attention at `attn` (a hybrid's are some)
    mlp_blocks: frozenset[int] = frozenset()
    block_children: Mapping[int, tuple[str, ...]] = field(default_factory=dict, hash=False)  # "name (Class)"
    cross: str | None = None  # relative to a block: cross-attention (an encoder–decoder model's decoder)
    stack: str = ""  # "encoder" or "decoder": the stack of an encoder–decoder model this describes
    stacks: Mapping[str, "ModelInfo"] = field(default_factory=dict, hash=False)  # both, on the model's own info

    @property
    def head_size(self) -> int | None:
        """One head's width, when attn_out's input splits evenly into the heads."""
        if not self.head_width or not self.heads or self.head_width % self.heads:
            return None
        return self.head_width // self.heads

    def has(self, layer: int, rel: str | None) -> bool:
        """Whether block `layer` has the module at `rel` (MoE models may mix dense and expert blocks)."""
        return rel is not None and f"{self.block(layer)}.{rel}" in self.module_names

    def block(self, layer: int) -> str:
        return f"{self.blocks}.{layer}"

    def blocks_with(self, kind: str) -> frozenset[int]:
        """The blocks that have this sublayer ("attn" or "mlp")."""
        return self.attn_blocks if kind == "attn" else self.mlp_blocks

    @property
    def block_container_names(self) -> tuple[str, ...]:
        """Every suffix of the block path that names it unambiguously: "model.layers" → ("model.layers", "layers")."""
        parts = self.blocks.split(".")
        return tuple(".".join(parts[i:]) for i in range(len(parts)))

    @classmethod
    def from_model(cls, model: nn.Module) -> "ModelInfo":
        """What garage knows of this model; an encoder–decoder model's info is its decoder's, with both stacks
        (each described alone, its layers counted from 0) in `stacks`."""
        config = model_config(model)
        text = text_config(model)
        model_type = str(getattr(text, "model_type", None) or getattr(config, "model_type", "unknown"))
        modules = dict(model.named_modules())
        facts = (modules, text, model_type, int(text.hidden_size), weights_fingerprint(model))
        stacks = stack_paths(model)
        if stacks:
            infos = {name: cls._described(*facts, _stack_blocks(modules, path), None, name) for name, path in stacks.items()}
            return dataclasses.replace(infos["decoder"], stacks=infos)
        row = ARCHS.get(model_type) or ARCHS.get(str(getattr(config, "model_type", "")))
        blocks = _find_blocks(modules, _layer_counts(text), row.blocks if row else None)
        return cls._described(*facts, blocks, row)

    @classmethod
    def _described(cls, modules: dict[str, nn.Module], text: Any, model_type: str, hidden: int, fingerprint: str,
                   blocks: str, row: ArchRow | None, stack: str = "") -> "ModelInfo":
        """The info of one stack of blocks (the model's only one, or one of an encoder–decoder's two)."""
        num_layers = len(modules[blocks])  # type: ignore[arg-type]
        discovered = row is None
        if row is None:
            row = _discover(modules, blocks, num_layers, hidden, within=_stack_root(blocks) if stack else "")
        base = blocks[: len(blocks) - len(row.blocks)] if blocks.endswith(row.blocks) else ""

        def full(rel: str | None) -> str | None:
            return base + rel if rel is not None and base + rel in modules else None

        def having(rel: str | None, kind: str = "") -> frozenset[int]:
            """The blocks with a module at `rel` (of the kind's classes, where discovery found it by class)."""
            paths = [(i, f"{blocks}.{i}.{rel}") for i in range(num_layers)] if rel is not None else []
            return frozenset(i for i, path in paths if path in modules and (
                not kind or not discovered or _is(modules[path], kind, strict=False)))

        def inside(rel: str | None) -> str | None:
            return rel if having(rel) else None

        def width_in(rel: str | None) -> int | None:
            """The input width of the first block's module at `rel`."""
            found = sorted(having(rel))
            return _input_width(modules[f"{blocks}.{found[0]}.{rel}"]) if found else None

        routers = [(i, rel) for i in range(num_layers) if (rel := _router_in(modules, f"{blocks}.{i}", row, hidden, discovered))]
        attn_out = inside(row.attn_out)
        heads = (f"{stack}_attention_heads",) * bool(stack) + ("num_attention_heads",)

        return cls(
            model_type=model_type,
            num_layers=num_layers,
            hidden_size=hidden,
            blocks=blocks,
            attn=inside(row.attn),
            mlp=inside(row.mlp),
            final_norm=full(row.final_norm),
            module_names=frozenset(modules),
            from_table=model_type in ARCHS,
            down=inside(row.down),
            ffn_width=width_in(row.down),
            out_widths={name: w for name, m in modules.items() if (w := _output_width(m)) not in (None, hidden)},
            attn_out=attn_out,
            heads=_config_int(text, heads),
            head_width=width_in(attn_out),
            router=routers[0][1] if routers else None,
            experts=_experts(modules[f"{blocks}.{routers[0][0]}.{routers[0][1]}"], hidden) if routers else 0,
            experts_per_token=_config_int(text, TOP_K_NAMES),
            fingerprint=fingerprint,
            attn_blocks=having(row.attn, "attn"),
            mlp_blocks=having(row.mlp, "mlp"),
            block_children={i: tuple(f"{name} ({type(m).__name__})" for name, m in modules[f"{blocks}.{i}"].named_children())
                            for i in range(num_layers)},
            cross=inside(row.cross) if stack == "decoder" else None,  # a causal BART has an unused `encoder_attn`
            stack=stack,
        )


STACKS = ("encoder", "decoder")  # an encoder–decoder model's two stacks, as sites name them


def stack_modules(model: nn.Module) -> dict[str, nn.Module]:
    """An encoder–decoder model's encoder and decoder modules (`get_encoder()`, `get_decoder()`); {} for others."""
    if not getattr(model_config(model), "is_encoder_decoder", False):
        return {}
    found = {}
    for name in STACKS:
        getter = getattr(model, f"get_{name}", None)
        try:
            module = getter() if callable(getter) else None
        except (AttributeError, NotImplementedError):
            module = None
        if not isinstance(module, nn.Module):
            return {}
        found[name] = module
    return found


def stack_paths(model: nn.Module) -> dict[str, str]:
    """The module paths of an encoder–decoder model's two stacks ("model.encoder", …); {} for other models."""
    paths = {id(m): name for name, m in model.named_modules()}
    return {name: paths[id(module)] for name, module in stack_modules(model).items() if id(module) in paths}


def weights_fingerprint(model: nn.Module) -> str:
    """A short hash of the first rows of the input embeddings (another model of the same architecture, or
    the same model fine-tuned, differs there); "" when the model has no values to read."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        weight = get().weight if callable(get) else None
    except (AttributeError, NotImplementedError):
        return ""
    if not isinstance(weight, torch.Tensor) or weight.is_meta or weight.dim() != 2:
        return ""
    rows = weight[:4].detach().to("cpu", torch.float32).contiguous()
    return hashlib.sha256(rows.numpy().tobytes()).hexdigest()[:16]


def _config_int(config: Any, names: tuple[str, ...]) -> int:
    """The first of these config fields that holds a positive int; 0 when none does, or when the config will
    not say (a heterogeneous config refuses to give one value for a per-layer field)."""
    for name in names:
        try:
            value = getattr(config, name, None)
        except Exception:  # transformers' AmbiguousGlobalPerLayerAttributeError, and the like
            continue
        if isinstance(value, int) and value > 0:
            return value
    return 0
