"""Activation capture and effect analysis: what a spec changes, layer by layer.

`capture` records hidden states by site name (through hooks, so nothing is traced). `layer_stats`
summarises a tensor. `compare` runs the model with and without a spec and reports, per block, the
cosine similarity and L2 distance between the two residual streams, over real (unpadded) tokens.
`routing` does the same for MoE routers: how each expert's share of the tokens moves. `patching` (from
`garage.patching`) sweeps activation patching between a clean and a corrupt prompt; `strength_sweep` (from
`garage.steering`) measures a steering strength's effect and damage over a range of coefficients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence, Union

import torch
from torch import nn

from . import ops
from .compiler import SpecLike, hook
from .lang.spec import Bias, Force
from .models import tokenizer_of, vocab_hash
from .patching import PatchingResult, patching  # noqa: F401 (garage.analyze.patching is the public name)
from .steering import StrengthSweep, strength_sweep  # noqa: F401 (likewise strength_sweep)
from .plan.archs import ModelInfo, text_config
from .plan.build_ops import at_site
from .plan.prepare import sites_named
from .plan.resolve import ConcreteSite
from .runtime.hooks import HookSet, attach
from .runtime.injected import InjectedModel
from .runtime.sampling import Generation

Inputs = Union[Mapping[str, torch.Tensor], torch.Tensor]  # tokenizer output, or input_ids alone


def _inputs(inputs: Inputs) -> dict[str, torch.Tensor]:
    return {"input_ids": inputs} if isinstance(inputs, torch.Tensor) else dict(inputs)


@torch.no_grad()
def capture(model: nn.Module, sites: str | int | Sequence[str | int] | None = None, inputs: Inputs | None = None,
            spec: SpecLike = "", bind: Mapping[str, object] | None = None, *,
            layers: Sequence[str | int] | None = None) -> Any:
    """Hidden states at each site ("h.*", "h.6.mlp", "final", "h.3.attn.heads{0, 5}", a block index, …),
    keyed by canonical site label, as `capture` records them (the chosen heads; zeros outside the chosen
    positions). With `spec`, its ops apply first (captures at a site come after the spec's ops there).

    Without inputs it is the seed's capture object: `with capture(model, layers=[0, 6, 11]) as snap:
    model(ids)`, then `snap[6]`, `snap.stats()` and `snap.table()` (see Snapshot)."""
    wanted = layers if layers is not None else sites
    if wanted is None:
        raise ValueError("name the sites or layers to capture, e.g. capture(model, layers=[0, 6, 11])")
    if inputs is None:
        return Snapshot(model, wanted)
    spec_hooks = hook(model, spec, bind)[0] if spec != "" else HookSet(model)
    with spec_hooks, Snapshot(model, wanted) as snap:  # attached after the spec's: they see its effect
        model(**_inputs(inputs))
    return {site.label: snap.states[site.label] for site in snap.sites}


def _sites(model: nn.Module, wanted: str | int | Sequence[str | int]) -> list[ConcreteSite]:
    info = ModelInfo.from_model(model)
    texts = [wanted] if isinstance(wanted, (str, int)) else list(wanted)
    return [site for text in texts for site in sites_named(info, f"h.{text}" if isinstance(text, int) else text)]


class Snapshot:
    """The seed's capture object: while its `with` block runs, every forward pass records the sites'
    hidden states (the last pass's are kept after the block ends). Index it by block index or label."""

    def __init__(self, model: nn.Module, wanted: str | int | Sequence[str | int]) -> None:
        self.model = model
        self.sites = _sites(model, wanted)
        self.states: dict[str, torch.Tensor] = {}
        self._hooks: HookSet | None = None

    def __enter__(self) -> "Snapshot":
        recorders = [at_site(ops.Capture(self.states, site.label), site) for site in self.sites]
        self._hooks = attach(self.model, self.sites, recorders)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks = None

    def __getitem__(self, key: str | int) -> torch.Tensor:
        label = f"h.{key}" if isinstance(key, int) else key
        if label not in self.states:
            raise KeyError(f"{key!r} was not captured (captured: {', '.join(self.states) or 'nothing yet'})")
        return self.states[label]

    def __len__(self) -> int:
        return len(self.states)

    def stats(self) -> dict[str, dict[str, float]]:
        """`layer_stats` of each captured site: mean, std, min, max, sparsity, entropy."""
        return {label: layer_stats(h) for label, h in self.states.items()}

    def table(self) -> str:
        """The stats as an aligned text table, one row a site."""
        return stats_table(self.stats())


def stats_table(stats: Mapping[str, Mapping[str, float]]) -> str:
    """Per-site statistics, one row a site: mean, std, sparsity and entropy."""
    rows = [("site", "mean", "std", "sparsity", "entropy")]
    rows += [(label, f"{s['mean']:+.4f}", f"{s['std']:.4f}", f"{s['sparsity']:.3f}", f"{s['entropy']:.3f}")
             for label, s in stats.items()]
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return "\n".join("  ".join(cell.rjust(w) if c else cell.ljust(w) for c, (cell, w) in enumerate(zip(row, widths)))
                     for row in rows)


@torch.no_grad()
def layer_stats(h: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, float]:
    """mean, std, min, max, sparsity (share of |x| < 1e-6) and entropy (nats, of softmax over hidden, per token)."""
    x = h.float()
    if mask is not None and x.dim() == 3:
        x = x[mask.bool()]
    x = x.reshape(-1, x.shape[-1])
    probs = x.softmax(-1)
    entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1).mean()
    return {
        "mean": x.mean().item(),
        "std": x.std().item() if x.numel() > 1 else 0.0,
        "min": x.min().item(),
        "max": x.max().item(),
        "sparsity": (x.abs() < 1e-6).float().mean().item(),
        "entropy": entropy.item(),
    }


@dataclass(frozen=True)
class LayerEffect:
    site: str
    cosine: float  # mean over real tokens of cos(h_spec, h_plain)
    l2: float  # mean over real tokens of ‖h_spec − h_plain‖


@torch.no_grad()
def compare(model: nn.Module, spec: SpecLike, inputs: Inputs, bind: Mapping[str, object] | None = None,
            sites: Sequence[str] | None = None) -> list[LayerEffect]:
    """Per site (by default each block's output and the final norm where there is one): how far the spec
    moves it. Any sites work, e.g. `["h.*.mlp.hidden"]`."""
    tensors = _inputs(inputs)
    mask = tensors.get("attention_mask")
    if sites is None:
        sites = ["h.*"] + (["final"] if _has_final(model) else [])
    plain = capture(model, sites, tensors)
    steered = capture(model, sites, tensors, spec=spec, bind=bind)
    effects = []
    for label, a in steered.items():
        a, b = _per_token(a, mask), _per_token(plain[label], mask)
        cosine = torch.nn.functional.cosine_similarity(a, b, dim=-1).mean().item()
        effects.append(LayerEffect(label, cosine, (a - b).norm(dim=-1).mean().item()))
    return effects


def _per_token(h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[real tokens, width] from a site's value: heads side by side, flattened values and padding dropped."""
    if h.dim() == 4:  # [batch, seq, heads, head size]
        h = h.flatten(-2)
    if mask is not None and h.shape[:-1] in (mask.shape, (mask.numel(),)):
        h = h[mask.reshape(h.shape[:-1]).bool()]
    return h.float().reshape(-1, h.shape[-1])


@torch.no_grad()
def generations(injected: InjectedModel, inputs: Inputs, seed: int = 0, **options: Any
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """What the model generates with the spec and without it, from the same prompt, options and seed: one
    request (`garage.runtime.sampling`), so `--sample --compare` draws both with the same sampler."""
    given = _inputs(inputs)
    ids, mask = given["input_ids"], given.get("attention_mask")
    torch.manual_seed(seed)
    steered = injected.generate(ids, attention_mask=mask, **options)
    request = Generation.resolve(getattr(injected.model, "generation_config", None), **options)
    torch.manual_seed(seed)
    plain = getattr(injected.model, "generate")(ids, attention_mask=mask, **request.generate_kwargs())
    return steered, plain


def _has_final(model: nn.Module) -> bool:
    return ModelInfo.from_model(model).final_norm is not None


def effect_table(effects: Sequence[LayerEffect], width: int = 30) -> str:
    """A table a person can read: cosine, L2, and a bar of 1 − cosine (how much the direction changed)."""
    most = max((1 - e.cosine for e in effects), default=0.0) or 1.0
    column = max([8, *(len(e.site) for e in effects)])
    rows = [f"{'site':{column}} {'cosine':>8} {'L2':>10}  change"]
    for e in effects:
        bar = "█" * round(width * (1 - e.cosine) / most) if e.cosine < 1 - 1e-7 else ""
        rows.append(f"{e.site:{column}} {e.cosine:8.4f} {e.l2:10.4f}  {bar}")
    return "\n".join(rows)


@dataclass(frozen=True)
class LayerRouting:
    """How one MoE block routes, with the spec and without: per expert, its share of the routing mass (the
    mean softmax probability over real tokens) and its share of the top-k slots (experts ranked by logit)."""

    site: str
    top_k: int
    chosen: tuple[int, ...]  # the experts the spec's `bias` (positive) or `force` favours at this router
    mass: tuple[float, ...]
    plain_mass: tuple[float, ...]
    slots: tuple[float, ...]
    plain_slots: tuple[float, ...]

    @property
    def chosen_slots(self) -> float:
        return sum(self.slots[e] for e in self.chosen)

    @property
    def plain_chosen_slots(self) -> float:
        return sum(self.plain_slots[e] for e in self.chosen)


def _favoured(step_op: object, module: nn.Module) -> tuple[int, ...]:
    """The experts one router op favours: `force K` → K; `bias` → those it raises."""
    if isinstance(step_op, Force):
        return (step_op.expert,)
    inner = ops.innermost(module)
    if isinstance(step_op, Bias) and isinstance(inner, ops.Add):
        raised = (inner.factor * inner.vector > 0).nonzero().flatten()
        return tuple(int(e) for e in raised)
    return ()


def _shares(logits: torch.Tensor, real: torch.Tensor | None, top_k: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = _per_token(logits, real)
    mass = x.softmax(-1).mean(0)
    top = x.topk(top_k, -1)
    live = (top.values > torch.finfo(x.dtype).min).float()  # a masked expert's slot carries no weight: not counted
    picked = torch.zeros_like(mass).index_add_(0, top.indices.flatten(), live.flatten())
    return tuple(mass.tolist()), tuple((picked / picked.sum()).tolist())


@torch.no_grad()
def routing(model: nn.Module, spec: SpecLike | None, inputs: Inputs, bind: Mapping[str, object] | None = None,
            ) -> list[LayerRouting]:
    """Per MoE block, how tokens are routed with the spec and without it (figures from each router's logits,
    after the spec's ops there: softmax for the mass, top-k by logit for the slots)."""
    info = ModelInfo.from_model(model)
    if info.router is None:
        raise ValueError(f"this model ({info.model_type}) has no mixture-of-experts router that garage knows")
    tensors = _inputs(inputs)
    real = tensors.get("attention_mask")
    sites = [f"h.{i}.router" for i in range(info.num_layers) if info.has(i, info.router)]
    top_k = info.experts_per_token or 1
    chosen: dict[str, set[int]] = {}
    spec_hooks = HookSet(model)
    plain = capture(model, sites, tensors)
    if spec not in (None, ""):
        spec_hooks, prepared = hook(model, spec, bind)
        for step, module in zip(prepared.plan, prepared.modules):
            if step.site.kind == "router" and module is not None:
                chosen.setdefault(f"h.{step.site.layer}.router", set()).update(_favoured(step.op, module))
    with spec_hooks:
        steered = capture(model, sites, tensors)
    layers = []
    for site in sites:
        mass, slots = _shares(steered[site], real, top_k)
        plain_mass, plain_slots = _shares(plain[site], real, top_k)
        layers.append(LayerRouting(site, top_k, tuple(sorted(chosen.get(site, ()))), mass, plain_mass, slots, plain_slots))
    return layers


def routing_table(layers: Sequence[LayerRouting]) -> str:
    """Per router: each expert's mass and top-k slot share, plain → with the spec; chosen experts marked *,
    and their total slot share with the selectivity (how many times the plain share it is)."""
    rows = [f"{'router':12} {'expert':>7} {'mass':>15} {'top-k slots':>15}"]
    for layer in layers:
        for e, (m0, m1, s0, s1) in enumerate(zip(layer.plain_mass, layer.mass, layer.plain_slots, layer.slots)):
            mark = "*" if e in layer.chosen else " "
            rows.append(f"{layer.site if e == 0 else '':12} {e:>6}{mark} {m0:6.3f} → {m1:5.3f} {s0:6.3f} → {s1:5.3f}")
        if layer.chosen:
            before, after = layer.plain_chosen_slots, layer.chosen_slots
            ratio = f" ({after / before:.2f}×)" if before > 0 else ""
            rows.append(f"{'':12} {'chosen':>7} {'':15} {before:6.3f} → {after:5.3f}{ratio}")
    return "\n".join(rows)


@dataclass(frozen=True)
class ModelComparison:
    """Two models side by side: facts (what, A, B), and verdicts (what can pass between them, and why)."""

    facts: list[tuple[str, str, str]]
    verdicts: list[tuple[str, str]]

    def table(self, names: tuple[str, str]) -> str:
        rows = [("", *names), *self.facts]
        widths = [max(len(r[c]) for r in rows) for c in range(3)]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        return "\n".join(lines + [f"{what}: {verdict}" for what, verdict in self.verdicts])


def compare_models(a: nn.Module, b: nn.Module) -> ModelComparison:
    """Two models side by side, and whether blade files, live sources and blocks can pass between them."""
    infos = [ModelInfo.from_model(m) for m in (a, b)]
    configs = [text_config(m) for m in (a, b)]

    def both(read: Any) -> tuple[str, str]:
        first, second = (read(i, c) for i, c in zip(infos, configs))
        return str(first), str(second)

    tokenizers = [tokenizer_of(m) for m in (a, b)]
    hashes = [vocab_hash(t) if t is not None else "unknown" for t in tokenizers]
    rows = [
        ("model type", *both(lambda i, c: i.model_type)),
        ("blocks", *both(lambda i, c: i.num_layers)),
        ("hidden size", *both(lambda i, c: i.hidden_size)),
        ("attention heads", *both(lambda i, c: i.heads or "?")),
        ("KV heads", *both(lambda i, c: getattr(c, "num_key_value_heads", None) or i.heads or "?")),
        ("FFN width", *both(lambda i, c: i.ffn_width or "?")),
        ("experts", *both(lambda i, c: i.experts or "-")),
        ("vocabulary", *both(lambda i, c: getattr(c, "vocab_size", "?"))),
        ("tokenizer vocab hash", hashes[0], hashes[1]),
    ]
    same_hidden = infos[0].hidden_size == infos[1].hidden_size
    same_tokens = rows[7][1] == rows[7][2] and "unknown" not in hashes and hashes[0] == hashes[1]
    blade = "yes" if same_hidden else (f"only with `project linear` (hidden {infos[0].hidden_size} vs "
                                       f"{infos[1].hidden_size}: the Same-Dimension rule)")
    live = "yes" if same_tokens else ("no: their vocabularies differ" if "unknown" not in hashes
                                      else "unknown: a tokenizer is not known")
    shape = [(i.model_type, i.hidden_size, i.heads, i.ffn_width) for i in infos]
    blocks = "yes" if shape[0] == shape[1] else "no: " + ", ".join(
        name for name, x, y in zip(("type", "hidden", "heads", "FFN width"), *shape) if x != y) + " differ"
    verdicts = [("blade files pass (same hidden size)", blade), ("live source (same tokenizer)", live),
                ("blocks swappable", blocks)]
    return ModelComparison(rows, verdicts)
