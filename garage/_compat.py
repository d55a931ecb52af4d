"""Every use of a private (underscored or undocumented) torch or transformers API, but one.

garage leans on a few internals that have no public equivalent. Each is wrapped here with the versions it
was checked on and what breaks if it changes, so that a new torch or transformers release means reading
this file, and `_graph_format.py` (the on-disk form of exported graphs, which rebuilds fake tensors and
symbolic sizes). Each entry was checked on torch 2.13.0 and transformers 5.24.0, or on the versions it names.
pyproject.toml admits torch 2.11–2.14 and transformers 5.18–5.25, and the tests that exercise this file run
at both ends: `.ci/versions lowest` (torch 2.11.0, transformers 5.18.0) and `.ci/versions newest` (torch
2.14.1, transformers 5.25.0); the main suite runs torch 2.13.0. A change in any entry fails those tests.

May import: torch and transformers only (no garage module), so that every stage can import it.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import threading
import zipfile
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn
from torch.fx import GraphModule
from transformers import DynamicCache, EncoderDecoderCache, masking_utils
from transformers.cache_utils import DynamicLayer

_LOCK = threading.Lock()


# ------------------------------------------------------------------ torch.fx
def materialize(gm: GraphModule) -> None:
    """Generate a lazily built GraphModule's code now: dynamo does not trace a lazy `forward`.

    `real_recompile` is _LazyGraphModule's (checked on torch 2.13); a plain GraphModule lacks it and is
    already materialised."""
    real_recompile = getattr(gm, "real_recompile", None)
    if real_recompile is not None:
        real_recompile()


def copy_graph(base: GraphModule) -> torch.fx.Graph:
    """An independent copy of the base graph, keeping the exported module's calling convention.

    `Graph._codegen` (checked on torch 2.13) holds the pytree codegen that lets an exported module take
    keyword inputs and return a ModelOutput. If it changes, injected graphs take flat positional inputs
    and return flat tuples, which the scoring and step runners would reject at the first call."""
    graph = torch.fx.Graph()
    graph._codegen = base.graph._codegen
    graph.output(graph.graph_copy(base.graph, {}))
    return graph


def graph_module_like(base: GraphModule, owners: dict[str, Any], graph: torch.fx.Graph) -> GraphModule:
    """A GraphModule running `graph` over `owners` (its submodules and tensors), which calls and returns
    like `base` and generates its Python code on first call (so re-compiling a spec costs no codegen).

    `torch.fx._lazy_graph_module._LazyGraphModule` (torch >= 2.3), and the `_in_spec` / `_out_spec`
    pytree specs that an exported module carries (checked on torch 2.13). If the lazy class moves,
    `import garage` fails here; if the specs are renamed, injected graphs take and return flat tuples,
    and every differential test fails."""
    from torch.fx._lazy_graph_module import _LazyGraphModule

    gm = _LazyGraphModule(owners, graph, class_name=type(base).__name__)
    for attr in ("_in_spec", "_out_spec", "meta"):
        if hasattr(base, attr):
            setattr(gm, attr, getattr(base, attr))
    info = getattr(graph._codegen, "pytree_info", None)
    if info is not None and info.in_spec is not None:  # the graph's own: it may take more inputs than base
        gm._in_spec = info.in_spec
    return gm


def with_more_inputs(graph: torch.fx.Graph, extra: int) -> None:
    """Let a graph take `extra` more tensors at the end of its last positional argument, a tuple (the step
    graph's cache buffers), by giving it a new pytree codegen (`torch.fx.graph._PyTreeCodeGen` and
    `_PyTreeInfo`, checked on torch 2.13). If they change, fusing a live blade source into the step graph
    fails at this call, and the live-blade generation tests fail."""
    from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo
    from torch.utils import _pytree as pytree

    info = graph._codegen.pytree_info  # type: ignore[attr-defined]
    args, kwargs = pytree.tree_unflatten(list(range(info.in_spec.num_leaves)), info.in_spec)
    args = (*args[:-1], (*args[-1], *range(extra)))
    spec = pytree.tree_structure((args, kwargs))
    graph._codegen = _PyTreeCodeGen(_PyTreeInfo(info.orig_args, spec, info.out_spec))


def with_more_kwargs(graph: torch.fx.Graph, names: list[str]) -> None:
    """Let a graph that takes keyword inputs take these more (its last placeholders, in this order), by giving
    it a new pytree codegen, as `with_more_inputs` does (`_PyTreeCodeGen`, `_PyTreeInfo`, checked on torch
    2.13). If the classes change, patching from a source input fails at this call, and the patching tests
    fail."""
    from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo
    from torch.utils import _pytree as pytree

    info = graph._codegen.pytree_info  # type: ignore[attr-defined]
    args, kwargs = pytree.tree_unflatten(list(range(info.in_spec.num_leaves)), info.in_spec)
    spec = pytree.tree_structure((args, {**kwargs, **{name: 0 for name in names}}))
    graph._codegen = _PyTreeCodeGen(_PyTreeInfo([*info.orig_args, *names], spec, info.out_spec))


def statically_known_true(condition: Any) -> bool:
    """Whether a symbolic shape condition holds for every size (torch.fx.experimental.symbolic_shapes,
    an experimental namespace; checked on torch 2.13). If it goes, shape checks fail at import."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true as known

    return bool(known(condition))


@contextlib.contextmanager
def fake_mode_of(value: torch.Tensor) -> Iterator[Any]:
    """The fake mode a traced value lives in (None for a real tensor), entered, with real tensors allowed
    in it, so that user modules with real parameters can run on the fake value.

    `torch._guards.detect_fake_mode` and `FakeTensorMode.allow_non_fake_inputs` (checked on torch 2.13).
    If they change, shape checks of user modules fail with an error from torch instead of a diagnostic."""
    from torch._guards import detect_fake_mode

    mode = detect_fake_mode([value])
    if mode is None:
        yield None
        return
    previous = mode.allow_non_fake_inputs
    mode.allow_non_fake_inputs = True
    try:
        with mode:
            yield mode
    finally:
        mode.allow_non_fake_inputs = previous


def fake_tensor_limits() -> tuple[type[BaseException], ...]:
    """What fake tensors cannot do, as opposed to a module being wrong: branch on values (a guard on a
    data-dependent size or value), produce data-dependent shapes, or run an operator with no fake kernel.

    From `torch._subclasses.fake_tensor` and `torch.fx.experimental.symbolic_shapes` (checked on torch
    2.13). If one is renamed, that limit is reported as the module's error instead of as a warning."""
    from torch._subclasses import fake_tensor
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    names = ("DataDependentOutputException", "DynamicOutputShapeException", "UnsupportedOperatorException",
             "UnsupportedFakeTensorException")
    return (GuardOnDataDependentSymNode, *(getattr(fake_tensor, n) for n in names if hasattr(fake_tensor, n)))


# ------------------------------------------------------------------ torch.export
def module_with_guard_source(program: torch.export.ExportedProgram, attribute: str) -> GraphModule:
    """`program.module()`, with the source of its `_guards_fn` kept on that module as `attribute`: (the guard
    code lines, the `L[...]` path of each input), so the guards can be stored as data, not as code.

    Captured from `torch.export._unlift._convert_guards_code_to_fn(guards_code, paths_of_placeholders)`,
    which `.module()` calls to `exec` them (checked on torch 2.13). If it is renamed or changes its
    arguments, nothing is kept, and such graphs are exported each time instead of cached."""
    from torch.export import _unlift
    from torch.utils import _pytree as pytree

    original = getattr(_unlift, "_convert_guards_code_to_fn", None)
    seen: list[tuple[list[str], list[str]]] = []

    def capture(code: list[str], paths: list[tuple[Any, ...]]) -> Any:
        seen.append(([str(line) for line in code], ["L" + pytree.keystr(path) for path in paths]))
        return original(code, paths)  # type: ignore[misc]

    if original is None:
        return program.module()
    with _LOCK:  # the patch is process-wide: one export at a time sees it
        _unlift._convert_guards_code_to_fn = capture  # type: ignore[assignment]
        try:
            module = program.module()
        finally:
            _unlift._convert_guards_code_to_fn = original
    guards = getattr(module, "_guards_fn", None)
    if guards is not None and len(seen) == 1:
        setattr(guards, attribute, seen[0])
    return module


@contextlib.contextmanager
def stack_traces(keep: bool) -> Iterator[None]:
    """Whether torch.export records a Python stack trace on every node (`torch.fx.config.do_not_emit_stack_traces`,
    checked on torch 2.13). garage never reads them, and recording them is a tenth of a 30-layer export's time,
    so they are kept only when debugging. If the flag goes, exports record them again: slower, not wrong."""
    from torch.fx import config

    saved = getattr(config, "do_not_emit_stack_traces", None)
    if saved is None or keep:
        yield
        return
    config.do_not_emit_stack_traces = True
    try:
        yield
    finally:
        config.do_not_emit_stack_traces = saved


def is_guard_failure(err: BaseException) -> bool:
    """Whether an error from running an exported graph is one of its input guards refusing the input (the
    `Guard failed: …` AssertionError of torch's `_guards_fn`, and of garage's rebuilt guards), or one of the
    runtime asserts a graph exported with deferred asserts keeps (`Runtime assertion failed for expression
    …`, a RuntimeError: a BERT2BERT decoder step's), not a bug (the messages checked on torch 2.13). If torch
    rewords them, a refused input raises instead of falling back to hooks, and the guard tests fail."""
    return ((isinstance(err, AssertionError) and "Guard failed" in str(err))
            or (isinstance(err, RuntimeError) and "Runtime assertion failed" in str(err)))


def fixes_dynamic_size(err: BaseException) -> bool:
    """Whether torch.export failed because the model's code fixes a dimension marked dynamic (its
    "Constraints violated" error, checked on torch 2.13): then a graph per input shape can still be traced.
    If torch rewords it, such models run by hooks instead, and the static-shape tests fail."""
    return "Constraints violated" in str(err)


# ------------------------------------------------------------------ torch.compile
@functools.lru_cache(maxsize=1)
def torch_version() -> tuple[int, int]:
    """(major, minor) of the running torch: `torch.__version__` is "2.13.0+cpu", "2.11.0+cu130", … (checked on
    torch 2.11, 2.13 and 2.14)."""
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


@functools.lru_cache(maxsize=1)
def _compile_settings() -> list[tuple[Any, str, Any]]:
    """(config module, flag, value) for each setting of `compile_settings`."""
    from torch._inductor import config as inductor_config
    from torch.fx.experimental import _config as fx_config

    settings: list[tuple[Any, str, Any]] = [(fx_config, "backed_size_oblivious", True)]
    if torch_version() < (2, 13):
        settings.append((inductor_config, "assert_indirect_indexing", False))
    for module, flag, _ in settings:
        getattr(module, flag)  # a renamed flag fails here, at the first compiled call
    return settings


@contextlib.contextmanager
def compile_settings() -> Iterator[None]:
    """The torch settings that compiled graphs run under (they compile on their first call, and on a recompile).

    - Size-1 dimensions are symbolic, so batch 1 never recompiles:
      `torch.fx.experimental._config.backed_size_oblivious` (checked on torch 2.11, 2.13 and 2.14).
    - torch < 2.13: the C++ (CPU) code generator can emit an indirect-indexing bounds check before the index
      it checks (`error: 'tmp6' was not declared in this scope`, seen on torch 2.11.0 in the step graph's
      attention mask), so those checks (`torch._inductor.config.assert_indirect_indexing`, a debugging aid)
      are off there.
    The flags are set and restored directly (torch's `config.patch` builds a class per call, a tenth of a
    millisecond that a batch-1 call on a GPU would feel). If a flag is renamed, the first compiled call raises."""
    settings = _compile_settings()
    saved = [getattr(module, flag) for module, flag, _ in settings]
    for module, flag, value in settings:
        setattr(module, flag, value)
    try:
        yield
    finally:
        for (module, flag, _), old in zip(settings, saved):
            setattr(module, flag, old)


def mark_dynamic(tensor: torch.Tensor, dim: int) -> None:
    """Mark a dimension dynamic for torch.compile from the first call (`torch._dynamo.maybe_mark_dynamic`,
    documented but in a private namespace; checked on torch 2.13). Without it, new sizes recompile."""
    torch._dynamo.maybe_mark_dynamic(tensor, dim)


def mark_static_address(tensor: torch.Tensor) -> None:
    """Tell torch.compile that this input keeps its address from call to call, so CUDA graphs read and write
    it in place instead of copying it (`torch._dynamo.mark_static_address`, unguarded: a new address
    re-records the graph; documented, in a private namespace; checked on torch 2.11, 2.13 and 2.14). It is
    how transformers' static cache marks its buffers. Without it, CUDA graphs skip the decode step, which
    writes its cache in place."""
    torch._dynamo.mark_static_address(tensor, guard=False)


def aoti_compile_and_package(program: torch.export.ExportedProgram, path: str) -> str:
    """AOTInductor's packager (`torch._inductor`, documented there; checked on torch 2.13)."""
    from torch._inductor import aoti_compile_and_package as package

    return str(package(program, package_path=path))


def aoti_load_package(path: str) -> Callable[..., Any]:
    """AOTInductor's loader (`torch._inductor`, documented there; checked on torch 2.13)."""
    from torch._inductor import aoti_load_package as load

    return load(path)


def pt2_pickled_entries(archive: zipfile.ZipFile) -> list[str]:
    """What in a `torch.export.save` archive `torch.export.load` would unpickle with full pickle (which runs
    code): weights and constants flagged `use_pickle`, custom or opaque objects, legacy `.pt` weight files,
    the legacy (pre-2.8) archive layout, and sample inputs that torch's weights-only unpickler refuses
    (torch then retries them with `weights_only=False`). A payload config this cannot read is listed too:
    what it would have said is unknown.

    Reads the archive layout of `torch.export.pt2_archive` (its constants and payload configs) and the
    sample-inputs fallback of `torch._export.serde.serialize.deserialize_torch_artifact` (checked on torch
    2.11, 2.13 and 2.14). If the layout changes, this refuses archives it does not know, never the reverse."""
    from torch.export.pt2_archive import constants as c

    # Opaque objects (OPAQUE_OBJ_FILENAME_PREFIX) came in torch 2.13; 2.11 and 2.12 store only custom objects.
    object_prefixes = tuple(getattr(c, name) for name in ("CUSTOM_OBJ_FILENAME_PREFIX", "OPAQUE_OBJ_FILENAME_PREFIX")
                            if hasattr(c, name))
    files = {name.split("/", 1)[1]: name for name in archive.namelist() if "/" in name}
    found: list[str] = []
    if files.get(c.ARCHIVE_FORMAT_PATH) is None or archive.read(files[c.ARCHIVE_FORMAT_PATH]).decode(
            "utf-8", "replace").strip() != c.ARCHIVE_FORMAT_VALUE:
        return ["the whole archive (not the pt2 archive format, or its legacy layout, which loads by pickle)"]
    for name, full in files.items():
        if name.startswith((c.WEIGHTS_DIR, c.CONSTANTS_DIR)) and name.endswith(".pt"):
            found.append(f"{name} (a legacy pickled weights file)")
        elif name.startswith((c.WEIGHTS_DIR, c.CONSTANTS_DIR)) and name.endswith("_config.json"):
            try:
                config = json.loads(archive.read(full))["config"]
                payloads = [(fqn, str(p.get("path_name", "")), bool(p.get("use_pickle"))) for fqn, p in config.items()]
            except (ValueError, KeyError, TypeError, AttributeError):  # not JSON, or not a payload config
                found.append(f"{name} (an unreadable payload config)")
                continue
            for fqn, path, use_pickle in payloads:
                if use_pickle or path.startswith(object_prefixes):
                    found.append(f"{name}: {fqn} (stored by pickle)")
        elif name.startswith(c.SAMPLE_INPUTS_DIR):
            try:
                torch.load(io.BytesIO(archive.read(full)), weights_only=True)
            except Exception as err:  # the weights-only unpickler refused it: torch would retry with full pickle
                found.append(f"{name} (sample inputs that need full pickle: {type(err).__name__})")
    return found


# ------------------------------------------------------------------ nn.Module
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
               "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")


@contextlib.contextmanager
def without_hooks(model: nn.Module) -> Iterator[None]:
    """Hooks on the model (a LayerInjector's, say) are set aside, then put back exactly.

    nn.Module keeps hooks in these private dicts (checked on torch 2.13). If one is renamed, its hooks
    would run inside a traced graph and be baked into it; the test that traces a hooked model fails."""
    stash = []
    for module in model.modules():
        for name in _HOOK_DICTS:
            hooks = getattr(module, name, None)
            if hooks:
                stash.append((hooks, dict(hooks)))
                hooks.clear()
    try:
        yield
    finally:
        for hooks, saved in stash:
            hooks.update(saved)


# ------------------------------------------------------------------ transformers
def attn_implementation(config: Any) -> str | None:
    """The attention kernel a model runs ("sdpa", "eager", …): `config._attn_implementation`, which
    transformers reads itself (checked on 5.24). If it goes, the unpadded fast path is never taken."""
    return getattr(config, "_attn_implementation", None)


@contextlib.contextmanager
def mask_skipping_allowed() -> Iterator[None]:
    """Let transformers skip the attention mask while exporting, so SDPA runs with `is_causal=True`.

    From transformers 5.2x on, masks are never skipped under export (`masking_utils.is_torchdynamo_exporting`),
    since a shape-specialised `is_causal` could be wrong; the unpadded graph is exported only for q_length ==
    kv_length without padding, where it is right, so that check is patched out here (checked on 5.24).
    Earlier 5.x releases test only whether the mask itself is traced, and the unpadded graph passes none, so
    there is nothing to patch. If the check is renamed again, the unpadded graph keeps an explicit mask:
    still correct, only slower, and the test of the causal path fails."""
    saved = getattr(masking_utils, "is_torchdynamo_exporting", None)
    if saved is None:
        yield
        return
    masking_utils.is_torchdynamo_exporting = lambda: False
    try:
        yield
    finally:
        masking_utils.is_torchdynamo_exporting = saved


def flat_cache(cache: DynamicCache) -> list[torch.Tensor]:
    """(k0, v0, k1, v1, …) of a DynamicCache: `cache.layers[i].keys / .values` (checked on 5.24)."""
    layers: list[Any] = list(cache.layers)
    return [t for layer in layers for t in (layer.keys, layer.values)]


@functools.lru_cache(maxsize=1)
def generation_defaults() -> dict[str, Any]:
    """transformers' global generation defaults (top_k 50, temperature 1.0, …), which `model.generate` applies
    to fields that neither the call nor the model's generation config sets:
    `GenerationConfig._get_default_generation_params()` (checked on transformers 5.24 and 5.25). Releases
    without it set those defaults on every GenerationConfig itself, so nothing is missing there. If it is
    renamed, sampling without a top-k in the config would skip top-k, and the sampling test fails."""
    from transformers import GenerationConfig

    defaults = getattr(GenerationConfig, "_get_default_generation_params", None)
    return dict(defaults()) if callable(defaults) else {}


@functools.lru_cache(maxsize=1)
def repetition_penalty_skips_padding() -> bool:
    """Whether `model.generate` keeps the repetition penalty off left-padding tokens: transformers 5.24+
    passes each row's padding length to `RepetitionPenaltyLogitsProcessor(prompt_ignore_length=tensor)`,
    while 5.18 takes only an int there and passes none (checked on transformers 5.18, 5.24 and 5.25). Probed
    by building one, so a release that changes it is followed; if the probe is wrong, sampled or greedy
    tokens with a repetition penalty differ from model.generate's, and the sampling test fails."""
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    try:
        RepetitionPenaltyLogitsProcessor(1.5, prompt_ignore_length=torch.tensor([0]))
    except (TypeError, ValueError):
        return False
    return True


class SlotLayer(DynamicLayer):
    """A preallocated cache layer, written in place at `slot` (one cache index per new token) instead of grown.

    Overrides DynamicLayer's `update`, `get_seq_length` and `get_mask_sizes` and sets its `keys`,
    `values`, `is_initialized`, `dtype` and `device` fields (checked on transformers 5.24). If the layer
    protocol changes, the step graph fails to export, and generation tests fail."""

    keys: torch.Tensor
    values: torch.Tensor

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, slot: torch.Tensor) -> None:
        super().__init__()
        self.keys, self.values, self.slot = keys, values, slot
        self.is_initialized = True
        self.dtype, self.device = keys.dtype, keys.device

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys.index_copy_(2, self.slot, key_states)
        self.values.index_copy_(2, self.slot, value_states)
        return self.keys, self.values

    def get_seq_length(self) -> torch.Tensor:  # type: ignore[override]  # the mask functions take a tensor
        return self.slot[0]

    def get_mask_sizes(self, *args: Any, **kwargs: Any) -> tuple[int, int]:
        return self.keys.shape[-2], 0


def slot_cache(past: Sequence[torch.Tensor], slot: torch.Tensor) -> DynamicCache:
    """A cache over preallocated (k0, v0, k1, v1, …) buffers, written in place at `slot`, made by setting
    `DynamicCache.layers` (checked on transformers 5.24). If that attribute goes, the step graph fails
    to export, and generation tests fail."""
    cache = DynamicCache()
    cache.layers = [SlotLayer(k, v, slot) for k, v in zip(past[0::2], past[1::2])]
    return cache


class CrossLayer(DynamicLayer):
    """A cross-attention cache layer over preallocated [batch, heads, source, head size] buffers, written whole
    by an encoder–decoder model's first decoder step and read by the later ones. Overrides the same
    DynamicLayer parts as SlotLayer (checked on transformers 5.25); if the protocol changes, the decoder step
    graph fails to export, and the encoder–decoder generation tests fail."""

    keys: torch.Tensor
    values: torch.Tensor

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.keys, self.values = keys, values
        self.is_initialized = True
        self.dtype, self.device = keys.dtype, keys.device

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys.copy_(key_states)
        self.values.copy_(value_states)
        return self.keys, self.values

    def get_seq_length(self) -> int:  # the cache starts "not updated"; the step says which it is
        return 0


def both_caches(past: Sequence[torch.Tensor], layers: int, slots: torch.Tensor, cross_ready: bool) -> EncoderDecoderCache:
    """The self-attention slot cache over the first 2·layers buffers and the cross-attention cache over the next
    2·layers, marked as holding the source's keys and values (`cross_ready`) or as still to compute them (the
    layers read `EncoderDecoderCache.is_updated[layer]`, checked on transformers 5.25)."""
    cross = DynamicCache()
    cross.layers = [CrossLayer(k, v) for k, v in zip(past[2 * layers:4 * layers:2], past[2 * layers + 1:4 * layers:2])]
    cache = EncoderDecoderCache(slot_cache(past[:2 * layers], slots), cross)
    cache.is_updated = {i: cross_ready for i in range(layers)}
    return cache
