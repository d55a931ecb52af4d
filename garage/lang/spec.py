"""The typed, immutable AST of a .garage spec.

Every node carries the span it came from. Spans never take part in equality, so two specs that say
the same thing compare equal however they were spelt (this is what the formatter round-trip relies on).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Iterator, Literal, Union

from .diagnostics import Source, Span

NO_SPAN = Span(0, 0, 1)


def _span() -> Span:
    return field(default=NO_SPAN, compare=False, repr=False)


# ------------------------------------------------------------------ layer indices
@dataclass(frozen=True)
class Index:
    """`6`, or `-1` counting from the end."""

    value: int
    span: Span = _span()


@dataclass(frozen=True)
class NIndex:
    """`N-4`, `N+0`, `N`: arithmetic on the number of blocks."""

    offset: int
    span: Span = _span()


@dataclass(frozen=True)
class PercentIndex:
    """`87.5%`: floor(percent / 100 × N)."""

    percent: float
    span: Span = _span()


IndexExpr = Union[Index, NIndex, PercentIndex]


@dataclass(frozen=True)
class LayerRange:
    """`2..5`, inclusive at both ends."""

    start: IndexExpr
    end: IndexExpr
    span: Span = _span()


@dataclass(frozen=True)
class AllLayers:
    """`*`: every block."""

    span: Span = _span()


@dataclass(frozen=True)
class LayerSet:
    """`{1, 4, N-1}`."""

    items: tuple[Union[IndexExpr, LayerRange], ...]
    span: Span = _span()


LayerSelector = Union[IndexExpr, LayerRange, AllLayers, LayerSet]


# ------------------------------------------------------------------ token positions
PositionKind = Literal["last", "prompt", "new", "index", "slice"]


@dataclass(frozen=True)
class Positions:
    """`[last]`, `[prompt]`, `[new]`, `[i]` or `[a:b]`: which sequence positions an op touches."""

    kind: PositionKind
    start: int | None = None
    stop: int | None = None
    span: Span = _span()


# ------------------------------------------------------------------ sites
# mlp.hidden: the FFN's intermediate activation; attn.heads: each head's output before the attention's output
# projection; router: an MoE block's router logits.
COMPONENTS = ("out", "in", "attn", "mlp", "mlp.hidden", "attn.heads", "router", "cross")
LAYER_ALIASES = ("h", "layer", "layers", "blocks")
NAMED_SITES = ("embed", "final")
STACKS = ("encoder", "decoder")  # an encoder–decoder model's stacks: `encoder.h.2`, `decoder.final`


@dataclass(frozen=True)
class BlockSite:
    """A site in one or more decoder blocks: `h.6`, `h.2..5.mlp`, `N-4`, `transformer.h.6.attn.c_proj`.

    `container` is None for an alias (`h`, `layers`, …) or a bare index, else the model's own container
    path as written (`("transformer", "h")`). `subpath` is a module path inside the block; when it is
    set, `component` is "module". `heads` is the head subset of an `attn.heads` site (`{0, 5}`): sorted
    head indices, or None for every head.
    """

    layers: LayerSelector
    component: str = "out"
    subpath: tuple[str, ...] = ()
    container: tuple[str, ...] | None = None
    positions: Positions | None = None
    heads: tuple[int, ...] | None = None
    span: Span = _span()


@dataclass(frozen=True)
class NamedSite:
    """`embed` or `final`, or one stack's: `encoder.embed`, `decoder.final` (`stack` "" for the model's own)."""

    name: str
    positions: Positions | None = None
    span: Span = _span()
    stack: str = ""


@dataclass(frozen=True)
class ModuleSite:
    """The output of the module at a dotted path: `"a.b.c"` or an unquoted `transformer.ln_f`."""

    path: str
    positions: Positions | None = None
    span: Span = _span()


Site = Union[BlockSite, NamedSite, ModuleSite]


# ------------------------------------------------------------------ values
@dataclass(frozen=True)
class FileValue:
    """A tensor in a `.safetensors` or `.pt` file, optionally named by `#key`."""

    path: str
    key: str | None = None
    span: Span = _span()


@dataclass(frozen=True)
class BoundValue:
    """A name bound in Python through `bind={...}`."""

    name: str
    span: Span = _span()


@dataclass(frozen=True)
class ModelSource:
    """`model "path-or-id"`, or `model NAME` bound in Python: a live source model for a blade."""

    ref: str
    bound: bool = False
    span: Span = _span()


Value = Union[FileValue, BoundValue]
BladeSource = Union[FileValue, BoundValue, ModelSource]


# ------------------------------------------------------------------ ops
@dataclass(frozen=True)
class Scale:
    keyword: ClassVar[str] = "scale"
    factor: float
    span: Span = _span()


@dataclass(frozen=True)
class Add:
    keyword: ClassVar[str] = "add"
    value: Value
    factor: float | None = None
    span: Span = _span()


@dataclass(frozen=True)
class Learn:
    """`add learn [from VALUE] [* F]`: a trainable vector v (a parameter), starting at zero or at VALUE."""

    keyword: ClassVar[str] = "add"
    init: Value | None = None
    factor: float | None = None
    span: Span = _span()


@dataclass(frozen=True)
class Ablate:
    keyword: ClassVar[str] = "ablate"
    value: Value
    span: Span = _span()


@dataclass(frozen=True)
class Zero:
    keyword: ClassVar[str] = "zero"
    span: Span = _span()


@dataclass(frozen=True)
class Clamp:
    keyword: ClassVar[str] = "clamp"
    low: float
    high: float
    span: Span = _span()


@dataclass(frozen=True)
class Noise:
    keyword: ClassVar[str] = "noise"
    std: float
    always: bool = False
    span: Span = _span()


KwargValue = Union[float, str, bool, None]


@dataclass(frozen=True)
class ModuleOp:
    keyword: ClassVar[str] = "module"
    name: str
    kwargs: tuple[tuple[str, KwargValue], ...] = ()
    span: Span = _span()


@dataclass(frozen=True)
class Blade:
    """`blade METHOD [from SOURCE] [project KIND] [alpha F]`; method None is the bare self-debate chamber."""

    keyword: ClassVar[str] = "blade"
    method: str | None = None
    source: BladeSource | None = None
    project: str | None = None
    alpha: float | None = None
    layer: int | None = None  # the live source's layer (`layer K`; default: the same depth)
    span: Span = _span()


@dataclass(frozen=True)
class Debate:
    keyword: ClassVar[str] = "debate"
    method: str
    views: str | None = None
    strength: float | None = None
    span: Span = _span()


@dataclass(frozen=True)
class Bias:
    """`bias {2, 5} * 8` (those experts' router logits + 8) or `bias VALUE * F` (+ F × an [experts] vector)."""

    keyword: ClassVar[str] = "bias"
    experts: tuple[int, ...] | Value
    factor: float | None = None
    span: Span = _span()


@dataclass(frozen=True)
class Mask:
    """`mask {0, 1}`: those experts cannot be selected."""

    keyword: ClassVar[str] = "mask"
    experts: tuple[int, ...]
    span: Span = _span()


@dataclass(frozen=True)
class Force:
    """`force 3`: every token goes to expert 3."""

    keyword: ClassVar[str] = "force"
    expert: int
    span: Span = _span()


ROUTER_OPS = (Bias, Mask, Force)  # ops on router logits only


@dataclass(frozen=True)
class Patch:
    """`patch from source [mix F]`: the site's value from a second (source) input, h ← h + F·(s − h)."""

    keyword: ClassVar[str] = "patch"
    mix: float | None = None
    span: Span = _span()


@dataclass(frozen=True)
class Capture:
    keyword: ClassVar[str] = "capture"
    name: str
    span: Span = _span()


@dataclass(frozen=True)
class SaeFeatures:
    """`sae VALUE feature F EDIT`: features F (sorted, without repeats) of the SAE in VALUE (an SAELens folder, or
    a bound SAE) edited through its decoder: `add X`, `clamp X`, `zero` or `scale X` (`action`, with X the
    `amount`). `items` keeps each written feature or range (first, last, span), for errors at one of them."""

    keyword: ClassVar[str] = "sae"
    value: Value
    features: tuple[int, ...]
    action: str
    amount: float | None = None
    span: Span = _span()
    items: tuple[tuple[int, int, Span], ...] = field(default=(), compare=False, repr=False)

    def span_of(self, feature: int) -> Span:
        """Where the spec names `feature`: its number, or the range holding it."""
        return next((span for first, last, span in self.items if first <= feature <= last), self.span)


@dataclass(frozen=True)
class SaeCapture:
    """`sae VALUE capture NAME`: h unchanged; the SAE's feature activations are kept in `.captures[NAME]`."""

    keyword: ClassVar[str] = "sae"
    value: Value
    name: str
    span: Span = _span()


Op = Union[Scale, Add, Learn, Ablate, Zero, Clamp, Noise, ModuleOp, Blade, Debate, Bias, Mask, Force, Patch, SaeFeatures,
           SaeCapture, Capture]
OP_KEYWORDS = ("scale", "add", "ablate", "zero", "clamp", "noise", "module", "blade", "debate", "bias", "mask", "force",
               "patch", "sae", "capture")


def capture_name(op: Op) -> str | None:
    """The `.captures` name an op records under (`capture NAME`, `sae VALUE capture NAME`), or None."""
    return op.name if isinstance(op, (Capture, SaeCapture)) else None


# ------------------------------------------------------------------ statements
@dataclass(frozen=True)
class Condition:
    """`when SITE @ VALUE > F [soft T]`: a row's mean cosine of SITE's state with VALUE, compared with F
    (a step at F, or a sigmoid of temperature T)."""

    site: Site
    value: Value
    compare: str  # ">" or "<"
    threshold: float
    soft: float | None = None
    span: Span = _span()


@dataclass(frozen=True)
class At:
    """`at SITE OP [when CONDITION]`."""

    site: Site
    op: Op
    span: Span = _span()
    when: Condition | None = None


EXPECT_KEYS = ("layers", "hidden", "model")


@dataclass(frozen=True)
class Expect:
    """`expect layers 12` · `expect hidden 768` · `expect model "gpt2"`."""

    key: str
    value: int | str
    span: Span = _span()


Statement = Union[At, Expect]


@dataclass(frozen=True)
class Comment:
    """`# …` to the end of a line: not part of the meaning, but kept so that formatting loses nothing."""

    line: int
    column: int
    text: str


@dataclass(frozen=True)
class Spec:
    """A parsed spec: its statements in file order, the source they came from, and its comments."""

    statements: tuple[Statement, ...]
    source: Source = field(default_factory=lambda: Source(""), compare=False, repr=False)
    comments: tuple[Comment, ...] = field(default=(), compare=False, repr=False)

    def __iter__(self) -> Iterator[Statement]:
        return iter(self.statements)

    def __len__(self) -> int:
        return len(self.statements)

    @property
    def filename(self) -> str:
        return self.source.filename
