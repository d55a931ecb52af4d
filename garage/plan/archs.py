"""Per-architecture knowledge as data: where the blocks, attention, MLP and final norm live.

Paths in the table are relative to the base model (`transformer.` or `model.` is found at run time, so one
row serves GPT2Model and GPT2LMHeadModel alike). A model_type missing from the table falls back to
discovery: the one ModuleList whose length is `num_hidden_layers`, with common sublayer names inside.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn


@dataclass(frozen=True)
class ArchRow:
    blocks: str  # the block ModuleList, relative to the base model
    attn: str | None  # inside a block: the module whose output is attention before its residual add
    mlp: str | None  # inside a block: the MLP (or MoE) before its residual add
    final_norm: str | None  # relative to the base model
    down: str | None = None  # inside a block: the FFN's down projection, whose input is `h.I.mlp.hidden`
    attn_out: str | None = None  # inside a block: attention's output projection, whose input is `h.I.attn.heads`
    router: str | None = None  # inside a block: the MoE router, whose logits are `h.I.router`


_LLAMA_LIKE = ArchRow("layers", "self_attn", "mlp", "norm", "mlp.down_proj", "self_attn.o_proj")
_MOE = ArchRow("layers", "self_attn", "mlp", "norm", None, "self_attn.o_proj", "mlp.gate")
_GEMMA_POST_NORM = ArchRow("layers", "post_attention_layernorm", "post_feedforward_layernorm", "norm",
                           "mlp.down_proj", "self_attn.o_proj")

ARCHS: dict[str, ArchRow] = {
    "gpt2": ArchRow("h", "attn", "mlp", "ln_f", "mlp.c_proj", "attn.c_proj"),
    "gptj": ArchRow("h", "attn", "mlp", "ln_f", "mlp.fc_out", "attn.out_proj"),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    # Gemma 2/3 normalise each sublayer's output before the residual add: that norm's output is the site.
    "gemma2": _GEMMA_POST_NORM,
    "gemma3": _GEMMA_POST_NORM,
    "gemma3_text": _GEMMA_POST_NORM,
    "mixtral": _MOE,
    "qwen2_moe": _MOE,
    "qwen3_moe": _MOE,
    "gpt_neox": ArchRow("layers", "attention", "mlp", "final_layer_norm", "mlp.dense_4h_to_h", "attention.dense"),
    # OPT has no MLP module: fc2's output (flat [batch*seq, hidden]) is the MLP before its residual add.
    "opt": ArchRow("decoder.layers", "self_attn", "fc2", "decoder.final_layer_norm", "fc2", "self_attn.out_proj"),
    # BERT's `attention` and `output` modules already contain residual + LayerNorm; their dense layers do not.
    "bert": ArchRow("encoder.layer", "attention.output.dense", "output.dense", None, "output.dense",
                    "attention.output.dense"),
}

# Used by discovery, in order of preference.
_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
_MLP_NAMES = ("mlp", "feed_forward", "block_sparse_moe", "ffn")
_FINAL_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "final_norm")
_DOWN_NAMES = ("down_proj", "c_proj", "fc2", "dense_4h_to_h", "fc_out", "w2")
_ATTN_OUT_NAMES = ("o_proj", "out_proj", "c_proj", "dense", "o", "wo")
_ROUTER_NAMES = ("gate", "router")
_TOP_K_NAMES = ("num_experts_per_tok", "moe_topk", "top_k", "num_selected_experts")  # config fields, by family


def model_config(model: nn.Module) -> Any:
    """The Hugging Face config of a model (typed Any: each family has its own config class)."""
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError("garage needs a Hugging Face model (a module with a .config)")
    return config


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

    @property
    def block_container_names(self) -> tuple[str, ...]:
        """Every suffix of the block path that names it unambiguously: "model.layers" → ("model.layers", "layers")."""
        parts = self.blocks.split(".")
        return tuple(".".join(parts[i:]) for i in range(len(parts)))

    @classmethod
    def from_model(cls, model: nn.Module) -> "ModelInfo":
        config = model_config(model)
        text = text_config(model)
        num_layers = int(text.num_hidden_layers)
        hidden = int(text.hidden_size)
        model_type = str(getattr(text, "model_type", None) or getattr(config, "model_type", "unknown"))
        modules = dict(model.named_modules())
        row = ARCHS.get(model_type) or ARCHS.get(str(getattr(config, "model_type", "")))
        blocks = _find_blocks(modules, num_layers, row.blocks if row else None)
        discovered = row is None
        if row is None:
            row = _discover(modules, blocks)
        base = blocks[: len(blocks) - len(row.blocks)] if blocks.endswith(row.blocks) else ""

        def full(rel: str | None) -> str | None:
            return base + rel if rel is not None and base + rel in modules else None

        def inside(rel: str | None) -> str | None:
            return rel if rel is not None and f"{blocks}.0.{rel}" in modules else None

        routers = [(i, rel) for i in range(num_layers) if (rel := _router_in(modules, f"{blocks}.{i}", row, hidden, discovered))]
        attn_out = inside(row.attn_out)

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
            ffn_width=_input_width(modules.get(f"{blocks}.0.{row.down}")) if inside(row.down) else None,
            out_widths={name: w for name, m in modules.items() if (w := _output_width(m)) not in (None, hidden)},
            attn_out=attn_out,
            heads=_config_int(text, ("num_attention_heads",)),
            head_width=_input_width(modules.get(f"{blocks}.0.{attn_out}")) if attn_out else None,
            router=routers[0][1] if routers else None,
            experts=_experts(modules[f"{blocks}.{routers[0][0]}.{routers[0][1]}"], hidden) if routers else 0,
            experts_per_token=_config_int(text, _TOP_K_NAMES),
            fingerprint=weights_fingerprint(model),
        )


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


def _input_width(module: nn.Module | None) -> int | None:
    """How wide a projection's input is: a Linear's in_features, a GPT-2 Conv1D's weight rows."""
    if isinstance(module, nn.Linear):
        return module.in_features
    weight = getattr(module, "weight", None)
    if hasattr(module, "nf") and isinstance(weight, nn.Parameter) and weight.dim() == 2:  # Conv1D: [in, out]
        return int(weight.shape[0])
    return None


def _output_width(module: nn.Module) -> int | None:
    """How wide a module's output is, where its parameters say: a Linear's out_features, a GPT-2 Conv1D's
    `nf`, an Embedding's dimension, a norm's (a leaf with a 1-D weight) normalised width."""
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.Embedding):
        return module.embedding_dim
    weight = getattr(module, "weight", None)
    nf = getattr(module, "nf", None)
    if isinstance(nf, int) and isinstance(weight, nn.Parameter):
        return nf
    if isinstance(weight, nn.Parameter) and weight.dim() == 1 and next(module.children(), None) is None:
        return int(weight.shape[0])
    return None


def _experts(router: nn.Module, hidden: int) -> int:
    """How many experts a router scores: the rows of its [experts, hidden] weight, or of a Linear inside it."""
    for module in router.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter) and weight.dim() == 2 and weight.shape[1] == hidden and weight.shape[0] > 1:
            return int(weight.shape[0])
    return 0


def _router_in(modules: dict[str, nn.Module], block: str, row: ArchRow, hidden: int, discover: bool) -> str | None:
    """The router's path inside one block: the table's, or (for an unknown family) a `gate` or `router` module
    that scores experts, in the MLP or another sublayer of the block (a hybrid's `mixer`), never attention's."""
    if row.router is not None:
        return row.router if f"{block}.{row.router}" in modules else None
    if not discover:
        return None
    children = [name[len(block) + 1:] for name in modules if name.startswith(block + ".") and "." not in name[len(block) + 1:]]
    parents = [row.mlp] * (row.mlp is not None) + [c for c in children if c not in (row.mlp, row.attn)]
    for rel in (f"{parent}.{name}" for parent in parents for name in _ROUTER_NAMES):
        if f"{block}.{rel}" in modules and _experts(modules[f"{block}.{rel}"], hidden):
            return rel
    return None


def _find_blocks(modules: dict[str, nn.Module], num_layers: int, suffix: str | None) -> str:
    """The path of the block ModuleList: the table's suffix if given, else the one list of N modules."""
    lists = [name for name, m in modules.items() if isinstance(m, nn.ModuleList) and len(m) == num_layers and name]
    if suffix is not None:
        matching = [n for n in lists if n == suffix or n.endswith("." + suffix)]
        if len(matching) == 1:
            return matching[0]
    if len(lists) == 1:
        return lists[0]
    found = ", ".join(lists) or "none"
    raise TypeError(
        f"cannot tell where this model's {num_layers} blocks are (ModuleLists of that length: {found}); "
        "add a row for its model_type to garage.ARCHS"
    )


def _discover(modules: dict[str, nn.Module], blocks: str) -> ArchRow:
    """A table row guessed from common names, for architectures the table does not know."""
    base, _, rel_blocks = blocks.rpartition(".")
    prefix = base + "." if base else ""
    child_names = {name.split(".")[-1] for name in modules if name.startswith(blocks + ".0.")}
    top = {name[len(prefix):] for name in modules if name.startswith(prefix)}

    def first(names: tuple[str, ...], pool: set[str]) -> str | None:
        return next((n for n in names if n in pool), None)

    mlp = first(_MLP_NAMES, child_names)
    attn = first(_ATTN_NAMES, child_names)

    def child(parent: str | None, names: tuple[str, ...]) -> str | None:
        """`parent.name` for the first of `names` that is a direct child of `parent` in block 0."""
        found = first(names, {n[len(f"{blocks}.0.{parent}."):] for n in modules if parent and n.startswith(f"{blocks}.0.{parent}.")})
        return f"{parent}.{found}" if found else None

    return ArchRow(rel_blocks, attn, mlp, first(_FINAL_NAMES, top), child(mlp, _DOWN_NAMES), child(attn, _ATTN_OUT_NAMES))
