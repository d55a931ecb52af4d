"""Discovery: where an unknown family's blocks, attention, MLP, norms, projections and router live, found
from its module tree (the table of overrides and what garage knows of a model are in `archs.py`).

The blocks are the one ModuleList of the config's layer count (the text model's, in a multimodal model; each
stack's shallowest list, in an encoder–decoder model). In every block a known layout (BERT's, BART's, T5's),
then common sublayer names, then class names give each part (a hybrid's block 0 may have no attention); the
final norm is the last norm registered after the blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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
    cross: str | None = None  # inside a decoder block of an encoder–decoder model: cross-attention


# Used by discovery, in order of preference.
_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
_MLP_NAMES = ("mlp", "feed_forward", "block_sparse_moe", "ffn")
_FINAL_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "final_norm")
_DOWN_NAMES = ("down_proj", "c_proj", "fc2", "dense_4h_to_h", "fc_out", "w2")
_ATTN_OUT_NAMES = ("o_proj", "out_proj", "c_proj", "dense", "o", "wo", "output")  # LED's, BigBird-Pegasus's: `output`
_ROUTER_NAMES = ("gate", "router")
_CROSS_NAMES = ("encoder_attn", "EncDecAttention", "crossattention", "cross_attn", "cross_attention")
TOP_K_NAMES = ("num_experts_per_tok", "moe_topk", "top_k", "num_selected_experts")  # config fields, by family


def _stack_blocks(modules: dict[str, nn.Module], stack: str) -> str:
    """A stack's block list: the shallowest ModuleList inside it (T5's blocks hold ModuleLists of sublayers)."""
    lists = [name for name, m in modules.items() if isinstance(m, nn.ModuleList) and name.startswith(stack + ".")]
    if not lists:
        raise TypeError(f"cannot tell where the blocks of {stack} are: it holds no ModuleList")
    return min(lists, key=lambda name: name.count("."))


def _stack_root(blocks: str) -> str:
    return blocks.rpartition(".")[0]


def _input_width(module: nn.Module | None) -> int | None:
    """How wide a projection's input is: a Linear's (or I-BERT's QuantLinear's) in_features, a GPT-2
    Conv1D's weight rows, or the width of the Linear that a wrapper holds as `linear` (Moshi's)."""
    if isinstance(getattr(module, "in_features", None), int):
        return int(getattr(module, "in_features"))
    weight = getattr(module, "weight", None)
    if hasattr(module, "nf") and isinstance(weight, nn.Parameter) and weight.dim() == 2:  # Conv1D: [in, out]
        return int(weight.shape[0])
    inner = getattr(module, "linear", None)
    return _input_width(inner) if isinstance(inner, nn.Module) else None


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


_TOWERS = ("vision", "visual", "audio", "image", "speech")  # a multimodal model's other encoders


def _layer_counts(config: Any) -> tuple[int, ...]:
    """How many blocks the config says the model has: `num_hidden_layers`, then `num_layers` where it differs
    (LongCat-Flash counts two sublayers of each block in `num_hidden_layers`)."""
    counts = [getattr(config, name, None) for name in ("num_hidden_layers", "num_layers")]
    return tuple(dict.fromkeys(int(c) for c in counts if isinstance(c, int) and c > 0))


def _find_blocks(modules: dict[str, nn.Module], counts: tuple[int, ...], suffix: str | None) -> str:
    """The path of the block ModuleList: the table's suffix if given, else the one list of N modules (for the
    first of the config's counts that some list has)."""
    num_layers = next((n for n in counts if any(isinstance(m, nn.ModuleList) and len(m) == n for m in modules.values())),
                      counts[0])
    lists = [name for name, m in modules.items() if isinstance(m, nn.ModuleList) and len(m) == num_layers and name]
    text = [name for name in lists if not any(tower in name for tower in _TOWERS)]
    lists = text if len(text) == 1 else lists
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


# Block layouts whose sublayers are not one module each: the paths that identify one, and the parts it gives.
_LAYOUTS: tuple[tuple[tuple[str, ...], dict[str, str]], ...] = (
    # BERT and its clones: `attention` and `output` hold residual + LayerNorm; their dense layers do not.
    (("attention.output.dense",), dict(attn="attention.output.dense", attn_out="attention.output.dense")),
    (("crossattention.output.dense",), dict(cross="crossattention.output.dense")),  # a BERT decoder's
    (("intermediate", "output.dense"), dict(mlp="output.dense", down="output.dense")),  # FNet's too
    # MPNet: as BERT, with attention's output projection inside its own `attn`.
    (("attention.attn.o",), dict(attn="attention.attn.o", attn_out="attention.attn.o")),
    # BART and its kind: fc1 → activation → fc2 with no MLP module; fc2's output is the MLP's.
    (("fc1", "fc2"), dict(mlp="fc2", down="fc2")),
    # T5: sublayers wrapped with their norm and residual (`layer.0` attention; the FFN is `layer.1` in the
    # encoder, `layer.2` in the decoder, after cross-attention); the wrapped modules give the sites.
    (("layer.0.SelfAttention",), dict(attn="layer.0.SelfAttention", attn_out="layer.0.SelfAttention.o")),
    (("layer.1.DenseReluDense",), dict(mlp="layer.1.DenseReluDense", down="layer.1.DenseReluDense.wo")),
    (("layer.2.DenseReluDense",), dict(mlp="layer.2.DenseReluDense", down="layer.2.DenseReluDense.wo")),
)
# What attention and MLP classes are called, for a block whose sublayers have names garage does not know; a
# class that also holds a norm or a whole block (DbrxNormAttentionNorm, CpmAntSelfAttentionBlock) is not one.
_CLASS_WORDS = {"attn": ("attention", "attn", "selfatt"), "mlp": ("mlp", "feedforward", "ffn", "moe", "experts")}
_NOT_A_SUBLAYER = ("norm", "block", "layer", "output")
_OTHER_MIXERS = ("mamba", "recurrent", "ssm", "conv", "deltanet", "mixer", "rwkv")  # token mixers, not attention


def _is(module: nn.Module, kind: str, strict: bool = True) -> bool:
    """Whether a module's class says it is attention (or an MLP); not strict: or any class at all that is not
    the other kind (a named sublayer, such as `self_attn`, whatever its class)."""
    name = type(module).__name__.lower()
    other = _CLASS_WORDS["mlp"] + _OTHER_MIXERS if kind == "attn" else _CLASS_WORDS["attn"]
    if not strict:
        return not any(word in name for word in other) or any(w in name for w in _CLASS_WORDS[kind])
    return any(word in name for word in _CLASS_WORDS[kind]) and not any(word in name for word in _NOT_A_SUBLAYER)


def _by_class(rels: list[tuple[str, nn.Module]], kind: str) -> str | None:
    """The shallowest path in any block whose class is of this kind (first in module order at that depth)."""
    found = [rel for rel, module in rels if _is(module, kind)]
    return min(found, key=lambda rel: rel.count("."), default=None)


def _final_norm(modules: dict[str, nn.Module], blocks: str, within: str = "") -> str | None:
    """The last norm registered after the blocks in their parent module, or else in the nearest ancestor
    that has one after the module holding them: MPT's and Mamba's `norm_f`, mBART's `layer_norm`, RWKV's
    `ln_out`, RoBERTa-PreLayerNorm's `LayerNorm` beside its encoder (its full path). Not above `within`: an
    encoder's search stops at its own module, where the decoder's norm would come after it."""
    path = blocks
    while path and path != within:
        parent, _, child = path.rpartition(".")
        prefix = parent + "." if parent else ""
        siblings = [n[len(prefix):] for n in modules if n.startswith(prefix) and n and "." not in n[len(prefix):]]
        after = siblings[siblings.index(child) + 1:] if child in siblings else []
        norms = [name for name in after if _is_norm(modules[prefix + name]) and "embed" not in name]  # BART's
        if norms:  # `layernorm_embedding` is on the embeddings: a post-norm model has no final norm
            return prefix + norms[-1]
        path = parent
    return None


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)) or "norm" in type(module).__name__.lower()


def _discover(modules: dict[str, nn.Module], blocks: str, num_layers: int, hidden: int, within: str = "") -> ArchRow:
    """A table row found from the model's modules, for architectures the table does not know: a known layout,
    common names, then class names, in every block (a hybrid's block 0 may have no attention). `within`: the
    stack of an encoder–decoder model these blocks belong to."""
    parent = blocks.rpartition(".")[0]
    prefix = parent + "." if parent else ""
    every = [(name[len(inner):], m) for i in range(num_layers) for name, m in modules.items()
             if name.startswith(inner := f"{blocks}.{i}.")]
    rels = dict(reversed(every))  # each path in some block, with its first block's module
    top = {name[len(prefix):] for name in modules if name.startswith(prefix)}
    layout: dict[str, str] = {}
    for needs, parts in _LAYOUTS:
        if all(n in rels for n in needs):
            layout = {**parts, **layout}  # the first layout to give a part keeps it

    def first(names: tuple[str, ...], pool: set[str] | dict[str, nn.Module]) -> str | None:
        return next((n for n in names if n in pool), None)

    attn = layout.get("attn") or first(_ATTN_NAMES, rels) or _by_class(every, "attn")
    mlp = layout.get("mlp") or first(_MLP_NAMES, rels) or _by_class(every, "mlp")

    def child(parent: str | None, names: tuple[str, ...], down: bool) -> str | None:
        """`parent.name` for the first of `names` that is a direct child of `parent` in some block, else the
        last projection inside `parent` back to the hidden width (CTRL's MLP is a Sequential: `ffn.2`); a
        down projection's input is wider or narrower than hidden (RWKV's receptance gate is neither)."""
        named = next((f"{parent}.{n}" for n in names if parent and f"{parent}.{n}" in rels), None)
        back = [rel for rel, m in rels.items() if parent and rel.startswith(parent + ".") and _output_width(m) == hidden
                and (width := _input_width(m)) and (width != hidden or not down)]
        return named or (back[-1] if back else None)

    final = prefix + found if (found := first(_FINAL_NAMES, top)) else _final_norm(modules, blocks, within)
    crossing = [rel for rel in rels if rel.rpartition(".")[2] in _CROSS_NAMES]
    return ArchRow(blocks, attn, mlp, final,  # full paths: the final norm may sit above the blocks' parent
                   layout.get("down") or child(mlp, _DOWN_NAMES, True),
                   layout.get("attn_out") or child(attn, _ATTN_OUT_NAMES, False),
                   cross=layout.get("cross") or min(crossing, key=lambda rel: rel.count("."), default=None))
