"""Graph checks (networkx) and the blade rules: problems that are found by looking, not by running.

The graph check guards the rewrite itself: every injected node must reach the model's output (a
networkx reachability question; `graph.lint()` in the rewrite already refuses a malformed graph). Lints are warnings, each naming its rule: ops that cancel or are dead, captures that
are overwritten, the blade rules from the research (N-4 depth, gated over identity, same domain), and
vectors and SAEs used elsewhere than where they were made.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator, Sequence

import networkx as nx
from torch import nn
from torch.fx import GraphModule

from .. import ops
from ..lang import spec as ast
from ..plan.resolve import Plan, Step


@dataclass(frozen=True)
class Finding:
    step: Step
    message: str
    hint: str | None = None
    rule: str | None = None  # set for warnings; errors have none


def as_networkx(gm: GraphModule) -> nx.DiGraph:
    graph = nx.DiGraph()
    for node in gm.graph.nodes:
        graph.add_node(node.name)
        graph.add_edges_from((node.name, user.name) for user in node.users)
    return graph


def graph_findings(gm: GraphModule, plan: Plan, inserted: dict[int, str]) -> Iterator[Finding]:
    """Errors: an injected node whose value does not reach the model's output."""
    graph = as_networkx(gm)
    output = next(n.name for n in gm.graph.nodes if n.op == "output")
    reaching = nx.ancestors(graph, output)
    for index, node in inserted.items():
        if node not in reaching:
            yield Finding(plan.steps[index], f"the op at {plan.steps[index].site.label} does not reach the model's output",
                          "this site's value is not used by the model's result; choose another site")


_NO_EFFECT_AFTER_ZERO = (ast.Scale, ast.Clamp, ast.Ablate, ast.Zero)


def dead_op_findings(plan: Plan) -> Iterator[Finding]:
    """Warnings: ops that a later or earlier `zero` cancels, and captures a later capture overwrites."""
    by_site: dict[tuple[str, str], list[Step]] = {}
    for step in plan:
        if step.site.positions is None:
            by_site.setdefault(step.site.key, []).append(step)
    for steps in by_site.values():
        zero: Step | None = None
        for step in steps:
            if zero is not None and isinstance(step.op, _NO_EFFECT_AFTER_ZERO) and not (
                isinstance(step.op, ast.Clamp) and not step.op.low <= 0 <= step.op.high
            ):
                yield Finding(step, f"`{step.op.keyword}` at {step.site.label} has no effect: line {zero.span.line} zeroes it first",
                              "remove it, or move it before the zero", "dead-op")
            if isinstance(step.op, ast.Zero):
                for earlier in steps[: steps.index(step)]:
                    if ast.capture_name(earlier.op) is None and not isinstance(earlier.op, ast.Zero):
                        yield Finding(earlier, f"`{earlier.op.keyword}` at {earlier.site.label} is undone by `zero` on line {step.span.line}",
                                      "remove one of them", "dead-op")
                zero = step
    captured: dict[str, Step] = {}
    for step in plan:
        name = ast.capture_name(step.op)
        if name is not None:
            previous = captured.get(name)
            if previous is not None and previous.statement != step.statement:
                yield Finding(previous, f"capture '{name}' is overwritten by line {step.span.line}",
                              "give each capture its own name", "capture-overwritten")
            captured[name] = step


def blocks_of(plan: Plan, step: Step) -> int:
    """How many blocks the stack of a step's site has (the model's, or its encoder's or decoder's)."""
    return plan.info.stacks.get(step.site.stack, plan.info).num_layers


def blade_findings(plan: Plan, modules: Sequence[nn.Module | None]) -> Iterator[Finding]:
    """Warnings: the blade rules (N-4 depth, gated over identity, same-domain synergy) and what blade files
    record (the depth they were taken at, the model they were taken from)."""
    domains: dict[str, Step] = {}
    for step, module in zip(plan, modules):
        if not isinstance(step.op, (ast.Blade, ast.Debate)):
            continue
        n = blocks_of(plan, step)
        best = n - 4
        if step.site.layer is not None and abs(step.site.layer - best) > 1 and n > 4:
            yield Finding(step, f"{step.op.keyword} at layer {step.site.layer} is far from N-4 = {best} (87.5% depth), "
                          "where blades work best", f"move it to h.N-4 (= h.{best})", "n-4")
        if isinstance(step.op, ast.Blade) and step.op.method == "identity":
            yield Finding(step, "`blade identity` adds the blade ungated; learned gating did better (+8.9%)",
                          "write `blade gated`", "gated-over-identity")
        inner = ops.innermost(module) if module is not None else None
        if isinstance(inner, ops.Blade) and isinstance(inner.source, (ops.TensorSource, ops.LiveSource)):
            yield from _provenance(step, inner.source.metadata, plan)
            domain = inner.source.metadata.get("domain")
            if domain:
                others = {d: s for d, s in domains.items() if d != domain}
                if others:
                    other, where = next(iter(others.items()))
                    yield Finding(step, f"blade from domain '{domain}' is stacked with a blade from domain '{other}' "
                                  f"(line {where.span.line}); blades synergize within one domain",
                                  "use blades recorded in the same domain", "same-domain")
                domains.setdefault(domain, step)


def _provenance(step: Step, made: dict[str, str], plan: Plan) -> Iterator[Finding]:
    """Warnings from what a blade file records (or a live source's site): taken at another depth than it is
    added at, or taken from this very model (no capability gap to transfer)."""
    n, layer = blocks_of(plan, step), step.site.layer
    try:
        depth = float(made.get("depth", ""))
    except ValueError:
        depth = None
    if depth is not None and layer is not None and abs(depth - layer / n) > 1 / n + 1e-9:
        where = f"h.{made.get('layer', '?')} of {made.get('num_layers', '?')} blocks"
        yield Finding(step, f"this blade was taken at depth {depth:.0%} ({where}) but is added at depth "
                      f"{layer / n:.0%} (h.{layer} of {n})", f"add it at h.{round(depth * n)}, or take one at "
                      f"h.{layer}'s depth", "blade-depth")
    if made.get("weights") and made["weights"] == plan.info.fingerprint:
        yield Finding(step, "this blade was taken from this very model: there is no capability gap for it to "
                      "bridge (blade rule 3)", "take the blade from a stronger source model", "blade-self")


def vector_findings(plan: Plan, modules: Sequence[nn.Module | None]) -> Iterator[Finding]:
    """Warnings: a steering vector used on another model type, or at another layer, than it was made at
    (as its file records; its hidden size is checked when it is loaded)."""
    for step, module in zip(plan, modules):
        inner = ops.innermost(module) if module is not None else None
        if not isinstance(inner, (ops.Add, ops.Ablate)) or not inner.metadata:
            continue
        made = inner.metadata
        if made.get("model_type") and made["model_type"] != plan.info.model_type:
            yield Finding(step, f"this vector was made on a {made['model_type']} model, not {plan.info.model_type}",
                          "make it on this model: garage vector --model …", "vector-model")
        layer = made.get("layer", "")
        stack = made.get("site", "").partition(".h.")[0] if ".h." in made.get("site", "") else ""
        if stack != step.site.stack and (stack or step.site.stack):
            yield Finding(step, f"this vector was made in the {stack or 'model'}'s blocks ({made.get('site', '?')}) "
                          f"but is used at {step.site.label}", f"make one at {step.site.label}", "vector-layer")
        elif layer.isdigit() and step.site.layer is not None and int(layer) != step.site.layer:
            yield Finding(step, f"this vector was made at layer {layer} ({made.get('site', '?')}) but is used at "
                          f"layer {step.site.layer}", f"use it at h.{layer}, or make one at this layer", "vector-layer")


def sae_findings(plan: Plan, modules: Sequence[nn.Module | None]) -> Iterator[Finding]:
    """Warnings: an SAE used at another site than the one its config's hook_name records it was trained on
    (its features describe that site's activations, not these), or one whose hook garage cannot place."""
    for step, module in zip(plan, modules):
        inner = ops.innermost(module) if module is not None else None
        if not isinstance(inner, (ops.SaeFeatures, ops.SaeCapture)) or inner.sae.hook_name is None:
            continue
        sae, here = inner.sae, step.site
        trained = sae.trained_at
        if trained is None:
            yield Finding(step, f"this SAE was trained at {sae.hook_name}, a hook garage cannot match to a site",
                          f"check that it reads {here.label}'s activations", "sae-site")
        elif trained != (here.kind, here.layer):
            yield Finding(step, f"this SAE was trained at {sae.hook_name} ({sae.site}) but is used at "
                          f"{replace(here, positions=None).label}", f"use it at {sae.site}, or an SAE trained at this site",
                          "sae-site")


def dedupe(findings: Iterator[Finding]) -> list[Finding]:
    """One finding per statement and message kind: a statement over 12 layers warns once, not 12 times."""
    seen: set[tuple[int, str | None, str]] = set()
    kept = []
    for f in findings:
        key = (f.step.statement, f.rule, f.message if f.rule is None else "")
        if key not in seen:
            seen.add(key)
            kept.append(f)
    return kept
