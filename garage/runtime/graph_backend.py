"""The graph backend: a spec's ops run in injected fx graphs, one per graph kind, built on first use.

It asks the graph store (`garage.fx.store`) for each base graph and places the same op modules in every
graph it builds: a scoring graph per input signature (or per shape, for a model whose code fixes its
length), the unpadded scoring graph, and the generation step (for an encoder–decoder model: its encoder
and two decoder steps, each holding its own stack's sites). Where the store routes a graph kind to hooks,
that kind runs on the hook backend from then on (a VLM's image calls, while its text calls keep the graph);
where a graph's guards refuse an input, the whole use does; the store's warning is said once. Under
torch.compile, each graph is compiled on first use.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..fx import store
from ..fx.export import EXAMPLE_BATCH, EXAMPLE_SEQ, TraceFailure, is_encoder_decoder, signature, with_masks
from ..fx.fuse import injected
from ..fx.kinds import DecoderStep, Encode, GraphKind, Scoring, Shape, Static, Step, Unpadded, scoring_kind
from ..fx.locate import SiteNotFound
from ..fx.patch_source import SOURCE_INPUT, WEIGHT_INPUT, patch_indices
from ..fx.rewrite import Rewritten
from ..fx.seq2seq import decoder_start, step_buffers
from ..fx.steps import cache_shapes, unpadded_possible
from ..lang.diagnostics import Diagnostic, ValidationError
from ..ops import innermost
from ..plan.resolve import Plan
from .compiled import compiled, replays_cuda_graphs
from .decode import CrossBuffers, KVBuffers, decode_loop
from .hook_backend import HookBackend, graph_only
from .sampling import Generation

Runner = Callable[..., Any]


class GraphBackend:
    """Scoring and generation through injected graphs, with the hook backend standing in per use."""

    name = "graph"

    def __init__(self, model: nn.Module, plan: Plan, ops: list[nn.Module], compile_options: dict[str, Any] | None,
                 warn: Callable[[Diagnostic], None], graphs: dict[GraphKind, Rewritten]) -> None:
        """`graphs` holds the injected graphs the checker already built (they are not built again)."""
        self.model, self.plan, self.ops = model, plan, ops
        self._sites = [s.site for s in plan]
        self.hooks = HookBackend(model, self._sites, ops)
        self.fallbacks: dict[str, Diagnostic] = {}  # "scoring" / "generation" → why it runs by hooks
        self._hooked: set[GraphKind | str] = set()  # graph kinds that run by hooks (or whole uses: "scoring", …)
        self._compile, self._warn = compile_options, warn
        self._graphs = dict(graphs)
        self._runners: dict[GraphKind, Runner] = {}
        self._served: dict[tuple[GraphKind, Shape | None], GraphKind] = {}  # asked → the kind the store routed to
        self._token: Runner | None = None
        self._buffers: KVBuffers | None = None
        self._sources = [live.model for m in ops if (live := getattr(innermost(m), "live", None)) is not None]
        self.patches = len(patch_indices(ops))  # ops that read a source input's run
        self._causal_path = not self.patches and all(unpadded_possible(m) for m in [model, *self._sources])

    # ------------------------------------------------------------------ graphs
    def _inject(self, kind: GraphKind, base: torch.fx.GraphModule) -> Rewritten:
        """The ops placed in a graph of this kind: all of them, or the sites of the one stack it holds."""
        held = [i for i, site in enumerate(self._sites) if not kind.stack or site.stack == kind.stack]
        return injected(kind, base, [self._sites[i] for i in held], [self.ops[i] for i in held],
                        self.plan.info.hidden_size)

    def _place(self, kind: GraphKind, base: torch.fx.GraphModule) -> Rewritten:
        if kind not in self._graphs:
            self._graphs[kind] = self._inject(kind, base)
        return self._graphs[kind]

    def graph(self, kind: GraphKind) -> Rewritten:
        """The injected graph of this kind, with nothing standing in: a ValidationError says why it cannot be built."""
        try:
            return self._graphs[kind] if kind in self._graphs else self._place(kind, store.graph(self.model, kind))
        except SiteNotFound as err:
            raise self._unplaceable(kind, err) from None
        except TraceFailure as failure:
            raise ValidationError([store.trace_diagnostic(failure, self.plan.spec.filename, kind.use)]) \
                from failure.__cause__

    def _unplaceable(self, kind: GraphKind, err: SiteNotFound) -> ValidationError:
        return ValidationError([Diagnostic("error", f"cannot place the spec in the {kind.use} graph: {err}",
                                           self.plan.spec.filename, hint="name another site")])

    def explained(self) -> Rewritten | None:
        """The graph `explain` reads: the one the spec was checked on, else the scoring graph; None by hooks."""
        if not self._graphs and self._runner("scoring", scoring_kind(self.model)) is None:
            return None
        return next(iter(self._graphs.values()))

    def _runner(self, use: str, kind: GraphKind, shape: Shape = (EXAMPLE_BATCH, EXAMPLE_SEQ)
                ) -> tuple[GraphKind, Runner] | None:
        """The kind that serves this use and its runner (compiled when asked), as the store routes it; None
        when the use runs by hooks. A route is asked for once per kind (and per shape, where the store answers
        with a graph per shape): calls after the first cost two dictionary look-ups."""
        if kind in self._hooked or use in self._hooked:  # a VLM's image calls by hooks, its text calls in the graph
            return None
        served = self._served.get((kind, None)) or self._served.get((kind, shape))
        if served is not None:
            return served, self._runners[served]
        try:
            route = store.route(self.model, kind, self._place, self.plan.spec.filename, shape)
        except SiteNotFound as err:
            raise self._unplaceable(kind, err) from None
        except TraceFailure as failure:  # a model whose forward another library replaced
            raise ValidationError([store.trace_diagnostic(failure, self.plan.spec.filename)]) from failure.__cause__
        if route.kind is None:
            self._fall_back(use, route.warning, kind)
            return None
        if route.warning is not None:
            self._warn(route.warning)
        if route.kind not in self._runners:
            self._runners[route.kind] = self._compiled(route.kind, "step" if isinstance(route.kind, Step) else "scoring")
        self._served[kind, shape if isinstance(route.kind, Static) else None] = route.kind
        return route.kind, self._runners[route.kind]

    def _compiled(self, kind: GraphKind, how: str) -> Runner:
        gm = self._graphs[kind].graph_module
        return gm if self._compile is None else compiled(gm, how, self._compile)

    def _fall_back(self, use: str, warning: Diagnostic | None, kind: GraphKind | None = None) -> None:
        """This kind of graph (or, when a graph's guards refused an input, the whole use) runs by hooks from now on."""
        if warning is None:
            return
        refused = graph_only(self.plan, self.ops)  # hooks cannot stand in for what only the graph holds
        if refused is not None:
            span, what, hint = refused
            raise ValidationError([self.plan.spec.source.diagnostic(
                span, f"cannot build the {use} graph that {what} needs: {warning.message}", hint)])
        self.fallbacks[use] = warning
        self._hooked.add(kind if kind is not None else use)
        self._warn(warning)

    def _refused(self, use: str, err: Exception) -> None:
        """A graph's guards refused this input: the use runs by hooks from now on (any other error is raised)."""
        self._fall_back(use, store.refused(err, use, self.plan.spec.filename).warning)

    # ------------------------------------------------------------------ scoring
    def score(self, inputs: dict[str, torch.Tensor]) -> Any:
        """The model's output; a patching spec's inputs also hold `source_<name>` and `patch_weight`
        (`InjectedModel.forward` puts them there), which only its scoring graph takes."""
        ids = next(inputs[name] for name in ("input_ids", "decoder_input_ids", "input_features") if name in inputs)
        shape = (int(ids.shape[0]), int(ids.shape[-1]))
        if self.patches:
            return self._patched(inputs, shape)
        found = None
        if self._unpadded(inputs):  # no padding: SDPA's causal path, with no mask materialized
            found = self._runner("scoring", Unpadded(), shape)
            if found is None or not isinstance(found[0], Unpadded):
                self._causal_path = False  # the padded graph (or hooks) serves unpadded batches too
                found = None
        if found is None:
            found = self._runner("scoring", Scoring(signature(with_masks(inputs))), shape)
        if found is not None:
            try:
                return found[1](input_ids=inputs["input_ids"]) if isinstance(found[0], Unpadded) else found[1](**inputs)
            except (AssertionError, RuntimeError) as err:  # a guard or runtime assert refused it
                self._refused("scoring", err)
        return self.hooks.score(with_masks(inputs))

    def _patched(self, inputs: dict[str, torch.Tensor], shape: Shape) -> Any:
        """Scoring with the source inputs: always the padded scoring graph, never hooks (`_fall_back` raises)."""
        source = SOURCE_INPUT.format("")
        extra = {name: inputs.pop(name) for name in list(inputs) if name.startswith(source) or name == WEIGHT_INPUT}
        with_masks(inputs)
        found = self._runner("scoring", Scoring(signature(inputs)), shape)
        assert found is not None
        try:
            return found[1](**inputs, **extra)
        except (AssertionError, RuntimeError) as err:  # the graph refused the base input: an error, said as such
            self._refused("scoring", err)
            raise

    def _unpadded(self, inputs: dict[str, torch.Tensor]) -> bool:
        """Whether this call can take the unpadded graph: only ids (and an all-ones mask), 2+ tokens.

        Checking the mask reads it back (one sync), as transformers itself does before skipping a mask."""
        if not self._causal_path or set(inputs) - {"input_ids", "attention_mask"} or inputs["input_ids"].shape[1] < 2:
            return False
        mask = inputs.get("attention_mask")
        return mask is None or bool(mask.all())

    # ------------------------------------------------------------------ generation
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, request: Generation) -> torch.Tensor:
        if is_encoder_decoder(self.model):
            return self._generate_seq2seq(input_ids, attention_mask, request)
        found = self._runner("generation", Step())
        if found is not None and attention_mask is not None:
            step = found[1]
            try:
                dtype = next(self.model.parameters()).dtype
                return decode_loop(step, self._token_runner(step), self._kv_buffers(), dtype, input_ids, attention_mask,
                                   request)
            except (AssertionError, RuntimeError) as err:  # a guard or runtime assert refused it
                self._refused("generation", err)
        return self.hooks.generate(input_ids, attention_mask, request)

    def _generate_seq2seq(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, request: Generation
                          ) -> torch.Tensor:
        """The encoder graph once, then the first decoder step (which fills the cross-attention cache) and the
        token step, from the decoder's start token; `model.generate` under hooks where a graph cannot be built."""
        runners = [self._runner("generation", kind) for kind in (Encode(), DecoderStep(first=True), DecoderStep())]
        if attention_mask is None or any(found is None for found in runners):
            return self.hooks.generate(input_ids, attention_mask, request)
        encode, first, token = (found[1] for found in runners if found is not None)
        try:
            states = encode(input_ids=input_ids, attention_mask=attention_mask)
            own, cross = step_buffers(self._graphs[DecoderStep()].graph_module)
            buffers = CrossBuffers(self._kv_buffers(own), cross, states, attention_mask.to(torch.long))
            start = torch.full((input_ids.shape[0], 1), decoder_start(self.model), dtype=torch.long, device=input_ids.device)
            return decode_loop(first, token, buffers, states.dtype, start, torch.ones_like(start), request)
        except (AssertionError, RuntimeError) as err:  # a guard or runtime assert refused it
            self._refused("generation", err)
        return self.hooks.generate(input_ids, attention_mask, request)

    def _kv_buffers(self, shapes: list[tuple[int, int]] | None = None) -> KVBuffers:
        """The generation cache: kept between calls when the token step replays CUDA graphs."""
        if self._buffers is None:
            self._buffers = KVBuffers(shapes if shapes is not None else cache_shapes(self._graphs[Step()].graph_module),
                                      keep=replays_cuda_graphs(self._compile))
        return self._buffers

    def _token_runner(self, step: Runner) -> Runner:
        """The step graph for one-token steps. Eager, it is the step runner itself. Under torch.compile it is
        a second copy of the injected graph (dynamo caches compiled code per code object), so that the
        prompt's shapes and the one-token shape never recompile each other."""
        if self._token is None:
            if self._compile is None:
                self._token = step
            else:
                copy = self._inject(Step(), store.graph(self.model, Step()))
                self._token = compiled(copy.graph_module, "token", self._compile)
        return self._token
