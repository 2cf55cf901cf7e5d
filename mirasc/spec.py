"""The spec language: a YAML file with four axes (memory, bias, retention, learner) plus chunking.

`parse_spec(text)` parses the YAML, validates it into frozen pydantic models and raises `SpecError`
with the file, the YAML line, the dotted field, the bad value and what is allowed. Its expressions
are checked where the spec is derived (`mirasc.catalog` does both).
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_serializer
from pydantic_core import PydanticCustomError

from mirasc.errors import MAX_EXPONENT, FieldError, SpecError

MAX_SPEC_CHARS = 100_000  # a spec's text (shipped specs are under 1,000)
MAX_DEPTH = 12  # nested YAML mappings and lists (a spec needs 4)


def _not_a_flag(value: Any) -> Any:
    if isinstance(value, bool):
        raise PydanticCustomError("float_type", "Input should be a number, not true or false")
    return value


# A finite number (YAML 1.1 reads 1e-5 as a string, which pydantic converts); never true/false.
Number = Annotated[float, BeforeValidator(_not_a_flag)]
Count = Annotated[int, Field(strict=True)]  # an integer, not true/false or 2.5
Flag = Annotated[bool, Field(strict=True)]  # true or false, not 1 or "yes"


class _Strict(BaseModel):
    """No unknown fields; numbers finite (no .inf, .nan)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Gate(_Strict):
    """A per-token gate: an op input (`value` unset) of shape [B,T,H] (`head`) or [B,T,H,D]
    (`channel`), or a constant `value` fixed by the spec."""

    shape: Literal["head", "channel"] = "head"
    value: Number | None = None

    @property
    def is_input(self) -> bool:
        return self.value is None


# ---- memory ---------------------------------------------------------------------------------


class LayerNorm(_Strict):
    """LN(y) = (y - mean) / sqrt(var + eps) over the value channels, times ln_weight plus ln_bias
    (per-head op inputs [H, Dv]) when `affine`."""

    affine: Flag = False
    eps: Number = Field(1e-5, gt=0)


class _Memory(_Strict):
    """Every memory may carry a test-time bias b (`bias`: M(x) = ... + b, learned like W and kept
    in the state), a residual x + ..., a layer norm, and a skip connection for the read
    (`read_residual`: `input` reads o = M(q); `output` reads o = z + LN(z), z = W q [+ b])."""

    @property
    def norm(self) -> LayerNorm | None:
        """The layer norm of the memory's output (None without one)."""
        if self.layer_norm is True:
            return LayerNorm()
        return self.layer_norm or None


class MatrixMemory(_Memory):
    """M(x) = [x +] [LN](W x [+ b]), W in R^{dv x dk} per head."""

    kind: Literal["matrix"]
    residual: Flag = False
    layer_norm: Flag | LayerNorm = False
    bias: Flag = False
    read_residual: Literal["input", "output"] = "input"


class VectorMemory(_Memory):
    """M(x) = [x +] [LN](w * x [+ b]), a diagonal memory, w in R^d per head (needs dk == dv)."""

    kind: Literal["vector"]
    residual: Flag = False
    layer_norm: Flag | LayerNorm = False
    bias: Flag = False
    read_residual: Literal["input", "output"] = "input"


class MLPMemory(_Memory):
    """M(x) = [x +] [LN](W_d act(... act(W_1 x + b_1)) + b_d) (biases with `bias`), hidden width
    expansion * dk."""

    kind: Literal["mlp"]
    depth: Count = Field(2, ge=2, le=8)
    expansion: Count = Field(4, ge=1, le=16)
    activation: Literal["gelu", "silu", "relu", "tanh"] = "gelu"
    residual: Flag = True
    layer_norm: Flag | LayerNorm = True
    bias: Flag = False
    read_residual: Literal["input", "output"] = "input"


Memory = Annotated[MatrixMemory | VectorMemory | MLPMemory, Field(discriminator="kind")]


# ---- attentional bias -----------------------------------------------------------------------


class Window(_Strict):
    """Atlas's Omega rule: the inner loss at t is sum_(i=t-size+1..t) gamma_i l(M(k_i), v_i) over
    the tokens of t's sequence, gamma the `weight` gate (absent: 1); size 1 is the bias alone."""

    size: Count = Field(ge=1, le=1024)
    weight: Gate | None = None


class _BiasBase(_Strict):
    """Every bias may take a window; a bias without one dumps as before windows existed (so its
    spec's digest, the compile cache key, and its generated module are unchanged)."""

    window: Window | None = None

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        data = handler(self)
        if self.window is None:
            data.pop("window", None)
        return data


class _Smoothing(_BiasBase):
    smooth: Flag = False
    temperature: Number = Field(10.0, gt=0)
    eps: Number = Field(1e-6, gt=0)


class DotProductBias(_BiasBase):
    """l = -<M(k), v>: the Hebbian rule (linear attention, RetNet, Mamba2, GLA)."""

    kind: Literal["dot_product"]


class L2Bias(_BiasBase):
    """l = 1/2 ||r||^2: the delta rule."""

    kind: Literal["l2"]


class LpBias(_Smoothing):
    """l = ||r||_p^p (Moneta), gradient p sign(r)|r|^(p-1), smoothed by default."""

    kind: Literal["lp"]
    p: Number = Field(ge=1, le=MAX_EXPONENT)
    smooth: Flag = True


class HuberBias(_Smoothing):
    """Huber loss with threshold delta: `coordinate` (clip r), `norm` (H(||r||)), or `switch`
    (Yaad: the l2 gradient while ||r|| <= delta, else delta * sign(r))."""

    kind: Literal["huber"]
    variant: Literal["coordinate", "norm", "switch"] = "coordinate"
    delta: Gate


class RobustBias(_BiasBase):
    """l = 1/2 ||r||^2 + delta ||r||: robust to value shifts of radius delta."""

    kind: Literal["robust"]
    delta: Gate


class ExpressionBias(_Smoothing):
    """A user loss l = sum_j loss(r_j) + norm_loss(||r||) over the value channels.

    `loss` may use r, v, rnorm (in conditions), delta (if a delta gate is given) and `params`;
    `norm_loss` may use rnorm, delta and `params`."""

    kind: Literal["expression"]
    loss: str = "0"
    norm_loss: str = "0"
    params: dict[str, Number] = Field(default_factory=dict)
    delta: Gate | None = None


Bias = Annotated[
    DotProductBias | L2Bias | LpBias | HuberBias | RobustBias | ExpressionBias,
    Field(discriminator="kind"),
]


# ---- retention ------------------------------------------------------------------------------


class NoRetention(_Strict):
    """W_t = W_{t-1} - update."""

    kind: Literal["none"]


class L2Retention(_Strict):
    """W_t = alpha_t W_{t-1} - update (local + global l2, the forget gate)."""

    kind: Literal["l2"]
    decay: Gate


class LqRetention(_Strict):
    """A_t = alpha_t A_{t-1} - update; W_t = A_t / ||A_t||_q^(q-2) (`link: scale`, paper eq. 24)
    or sign(A)|A|^(q-1) / ||A||_q^(q-2) (`link: pnorm`); the norm is taken over `scope`."""

    kind: Literal["lq"]
    q: Number = Field(gt=1, le=MAX_EXPONENT)
    decay: Gate | None = None
    scope: Literal["matrix", "row", "column"] = "matrix"
    link: Literal["scale", "pnorm"] = "scale"
    eps: Number = Field(1e-6, gt=0)


class KLRetention(_Strict):
    """Z_t = alpha_t Z_{t-1} - update; W_t = c * softmax(Z_t) over `axis` (Memora, eq. 27)."""

    kind: Literal["kl"]
    decay: Gate | None = None
    axis: Literal["row", "column", "matrix"] = "row"
    scale: Number = Field(1.0, gt=0)


class ElasticNetRetention(_Strict):
    """W_t = S_gamma(alpha_t W_{t-1} - update) (`form: proximal`, eq. 22) or
    A_t = alpha_t A_{t-1} - update, W_t = S_gamma(A_t) (`form: dual`, eq. 23)."""

    kind: Literal["elastic_net"]
    gamma: Number = Field(gt=0)
    decay: Gate | None = None
    form: Literal["proximal", "dual"] = "proximal"
    smooth: Flag = False


class MirrorRetention(_Strict):
    """Mirror descent with a user potential f: Z_t = alpha_t Z_{t-1} - update, W_t = (f')^-1(Z_t)."""

    kind: Literal["mirror"]
    potential: str
    params: dict[str, Number] = Field(default_factory=dict)
    decay: Gate | None = None


Retention = Annotated[
    NoRetention | L2Retention | LqRetention | KLRetention | ElasticNetRetention | MirrorRetention,
    Field(discriminator="kind"),
]


# ---- learner --------------------------------------------------------------------------------


class GDLearner(_Strict):
    """update_t = eta_t grad_t. In a chunk, `eta_at: query` scales the summed updates by the
    reading token's step instead: W_t = W_s - eta_t sum_(i<=t) grad_i (TTT's mini-batch form)."""

    kind: Literal["gd"]
    eta: Gate
    grad_at: Literal["previous", "retained"] = "previous"
    eta_at: Literal["key", "query"] = "key"


class MomentumLearner(_Strict):
    """S_t = momentum_t S_{t-1} + eta_t grad_t; update_t = S_t (Titans)."""

    kind: Literal["momentum"]
    eta: Gate
    momentum: Gate
    grad_at: Literal["previous", "retained"] = "previous"


class MuonLearner(_Strict):
    """S_t = momentum_t S_{t-1} + grad_t; update_t = eta_t NS_k(S_t), NS_k the quintic
    Newton-Schulz iteration of `ns_steps` steps per memory matrix (Muon; Atlas). `apply: chunk`
    orthogonalises a chunk's last S once and applies it at the chunk's end (LaCT)."""

    kind: Literal["muon"]
    eta: Gate
    momentum: Gate
    ns_steps: Count = Field(5, ge=1, le=10)
    apply: Literal["token", "chunk"] = "token"
    grad_at: Literal["previous", "retained"] = "previous"


Learner = Annotated[GDLearner | MomentumLearner | MuonLearner, Field(discriminator="kind")]


# ---- the spec -------------------------------------------------------------------------------


class Spec(_Strict):
    """One memory layer: the four Miras axes plus how training chunks the sequence."""

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=64)
    description: str = ""
    memory: Memory
    bias: Bias
    retention: Retention
    learner: Learner
    chunk_size: Count = Field(64, ge=1, le=1024)
    lag_token: Flag = False

    @property
    def has_momentum(self) -> bool:
        """Whether the state carries momentum buffers S (the momentum and muon learners)."""
        return self.learner.kind in ("momentum", "muon")

    def gates(self) -> dict[str, Gate]:
        """Every gate of the spec by dotted field name."""
        found = {}
        for axis in ("bias", "retention", "learner"):
            for key in ("delta", "decay", "eta", "momentum"):
                gate = getattr(getattr(self, axis), key, None)
                if gate is not None:
                    found[f"{axis}.{key}"] = gate
        window = self.bias.window
        if window is not None and window.weight is not None:
            found["bias.window.weight"] = window.weight
        return found

    def digest(self) -> str:
        """A stable hash of the validated spec (the compile cache key)."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---- loading with line numbers --------------------------------------------------------------


def _check_yaml(text: str, source: str) -> None:
    """Refuse, from the event stream and before anything is built, what could make a small text
    expensive or ambiguous: anchors and aliases (an alias bomb expands exponentially), nesting
    deeper than MAX_DEPTH, keys that are not plain scalars, and strings that are not Unicode
    text (lone surrogates). Each refusal names the field and its line."""
    if len(text) > MAX_SPEC_CHARS:
        raise SpecError(f"{source}:1: the spec has {len(text)} characters; allowed: at most "
                        f"{MAX_SPEC_CHARS}")
    frames: list[dict] = []  # per open mapping or list: its current key or index

    def fail(event, why: str) -> SpecError:
        field = ".".join(str(f["at"]) for f in frames  # a mapping awaiting a key: its own path
                         if f["at"] is not None and not (f["mapping"] and f["key"])) or "<spec>"
        return SpecError(f"{source}:{event.start_mark.line + 1}: {field}: {why}")

    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if not isinstance(event, yaml.NodeEvent | yaml.CollectionEndEvent):
                continue
            parent = frames[-1] if frames else None
            if isinstance(event, yaml.CollectionEndEvent):
                frames.pop()
            elif parent is not None and parent["mapping"] and parent["key"]:
                if not isinstance(event, yaml.ScalarEvent) or event.anchor is not None:
                    raise fail(event, "a key must be a plain name")
                parent["at"], parent["key"] = event.value, False
                _check_text(event, fail)
                continue
            elif parent is not None and not parent["mapping"]:
                parent["at"] = parent["count"]
                parent["count"] += 1
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
                raise fail(event, "YAML anchors and aliases (&name, *name) are not allowed in a "
                                  "spec; write the value out")
            if isinstance(event, yaml.CollectionStartEvent):
                if len(frames) >= MAX_DEPTH:
                    raise fail(event, f"nested more than {MAX_DEPTH} levels deep; allowed: "
                                      f"at most {MAX_DEPTH}")
                frames.append({"mapping": isinstance(event, yaml.MappingStartEvent), "at": None,
                               "key": True, "count": 0})
                continue
            if isinstance(event, yaml.ScalarEvent):
                _check_text(event, fail)
                _check_boolean_word(event, fail)
            parent = frames[-1] if frames else None
            if parent is not None and parent["mapping"]:
                parent["key"] = True
    except yaml.YAMLError:
        return  # parse_spec reports the syntax error with its own line


YAML11_BOOLEANS = ("yes", "no", "on", "off")  # booleans in YAML 1.1 (PyYAML), text in YAML 1.2


def _check_boolean_word(event: yaml.ScalarEvent, fail) -> None:
    """Refuse an unquoted yes/no/on/off (any case) as a value: PyYAML reads some as booleans and
    others as text, while a spec's booleans are true and false only."""
    if event.style is None and event.value.lower() in YAML11_BOOLEANS:
        raise fail(event, f"{event.value!r} is not allowed: a spec's booleans are true and false "
                          f"only (YAML 1.1 words such as yes, no, on, off are not); write true "
                          f"or false, or quote it ('{event.value}') for the text")


def _check_text(event: yaml.ScalarEvent, fail) -> None:
    try:
        event.value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise fail(event, f"{event.value[exc.start]!r} at character {exc.start} is not Unicode "
                          "text (a lone surrogate); allowed: UTF-8 text") from None


def _index_lines(node: yaml.Node, path: tuple, lines: dict[tuple, int], source: str) -> None:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        seen: dict = {}
        for key, value in node.value:
            name = key.value
            if name in seen:
                raise SpecError(
                    f"{source}:{key.start_mark.line + 1}: {'.'.join(map(str, path + (name,)))}: "
                    f"duplicate key (first given on line {seen[name]}); give each field once"
                )
            seen[name] = key.start_mark.line + 1
            _index_lines(value, path + (name,), lines, source)
            lines[path + (name,)] = key.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _index_lines(item, path + (i,), lines, source)


def _model_fields_at(loc: tuple) -> list[str]:
    """The field names allowed at a validation-error location (for 'unknown field' messages)."""
    model: Any = Spec
    for part in loc:
        if isinstance(model, type) and issubclass(model, BaseModel) and part in model.model_fields:
            model = model.model_fields[part].annotation
        else:
            members = [
                m for m in getattr(model, "__args__", ()) if isinstance(m, type)
                and issubclass(m, BaseModel)
            ]
            tagged = [m for m in members if m.model_fields.get("kind") is not None
                      and part in getattr(m.model_fields["kind"].annotation, "__args__", ())]
            model = tagged[0] if tagged else (members[0] if len(members) == 1 else None)
        while getattr(model, "__origin__", None) is Annotated:
            model = model.__args__[0]
    members = [m for m in (model, *getattr(model, "__args__", ()))  # a `bool | Model` union too
               if isinstance(m, type) and issubclass(m, BaseModel)]
    return list(members[0].model_fields) if members else []


def _kinds_at(loc: tuple) -> str:
    """The allowed `kind` tags of the axis union at a top-level validation-error location."""
    info = Spec.model_fields.get(loc[0]) if len(loc) == 1 else None
    members = getattr(info.annotation, "__args__", ()) if info is not None else ()
    return ", ".join(repr(m.model_fields["kind"].annotation.__args__[0]) for m in members
                     if isinstance(m, type) and issubclass(m, BaseModel) and "kind" in m.model_fields)


def _yaml_path(loc: tuple, data: Any) -> tuple:
    """Drop pydantic's discriminator-tag steps from `loc`, keeping the keys present in the YAML."""
    path: list = []
    node, tagged = data, False
    for part in loc:
        if isinstance(node, dict) and not tagged and node.get("kind") == part:
            tagged = True  # the tag comes first, before a field of the same name (momentum)
            continue
        tagged = False
        if isinstance(node, dict) and part in node:
            path.append(part)
            node = node[part]
        else:
            path.append(part)
            node = None
    return tuple(path)


def _describe(error: dict, data: Any, lines: dict[tuple, int], source: str) -> str:
    path = _yaml_path(error["loc"], data)
    field = ".".join(str(p) for p in path) or "<spec>"
    line = next((lines[path[:i]] for i in range(len(path), -1, -1) if path[:i] in lines), 1)
    kind = error["type"]
    if kind == "extra_forbidden":
        allowed = [f for f in _model_fields_at(error["loc"][:-1]) if f != "kind"]
        close = difflib.get_close_matches(str(path[-1]), allowed, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"{source}:{line}: {field}: unknown field{hint}; allowed: {', '.join(allowed)}"
    if kind == "missing":
        return f"{source}:{line}: {field}: required field is missing"
    if kind == "union_tag_invalid":
        tags = error["ctx"]["expected_tags"]
        line = lines.get(path + ("kind",), line)
        return f"{source}:{line}: {field}.kind: {error['ctx']['tag']!r} is not known; allowed: {tags}"
    if kind == "union_tag_not_found":
        kinds = _kinds_at(error["loc"])
        hint = f"; allowed: {kinds}" if kinds else ""
        return f"{source}:{line}: {field}: needs a 'kind' field{hint}"
    message = error["msg"].removeprefix("Value error, ")
    if kind == "model_type" and error.get("ctx", {}).get("class_name") == Gate.__name__:
        message = ("a gate is a mapping {shape: head | channel, value: number}; a constant is "
                   f"{{value: {error['input']!r}}}, an op input {{shape: head}}")
    if kind == "value_error":
        return f"{source}:{line}: {message}"
    value = error["input"]
    shown = repr(value)
    if len(shown) > 80:  # a long value is named by its start and size, not echoed whole
        size = f"{len(value)} characters" if isinstance(value, str) else type(value).__name__
        shown = f"{shown[:60]}... ({size})"
    return f"{source}:{line}: {field}: {shown} is not allowed: {message}"


def _select_branches(errors: list[dict]) -> list[dict]:
    """For a `bool | mapping` field (memory.layer_norm) keep the errors of the branch that the
    YAML value's type selects (a mapping: the model's; anything else: the flag's), without the
    branch tag in the location."""
    kept = []
    for error in errors:
        loc = error["loc"]
        if "bool" in loc:
            if isinstance(error["input"], dict):
                continue
            error = error | {"msg": "allowed: true, false, or a mapping with fields "
                                    f"{', '.join(LayerNorm.model_fields)}"}
            loc = tuple(part for part in loc if part != "bool")
        elif LayerNorm.__name__ in loc:
            if loc[-1] == LayerNorm.__name__:  # not a mapping: reported by the flag's branch
                continue
            loc = tuple(part for part in loc if part != LayerNorm.__name__)
        kept.append(error | {"loc": loc})
    return kept


def parse_spec(text: str, source: str = "<spec>") -> Spec:
    """Validate YAML text into a `Spec` (its fields, constant gates and cross-axis rules; not its
    expressions), raising `SpecError` on the first problems found."""
    _check_yaml(text, source)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else 1
        context, start = getattr(exc, "context", None), getattr(exc, "context_mark", None)
        where = f" ({context} on line {start.line + 1})" if context and start else ""
        problem = getattr(exc, "problem", exc)
        raise SpecError(f"{source}:{line}: not valid YAML: {problem}{where}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{source}:1: a spec is a YAML mapping with fields name, memory, bias, "
                        "retention, learner")
    lines: dict[tuple, int] = {}
    _index_lines(node, (), lines, source)
    try:
        spec = Spec.model_validate(data)
    except ValidationError as exc:
        errors = _select_branches(exc.errors())
        raise SpecError("\n".join(_describe(e, data, lines, source) for e in errors)) from None
    try:
        _check_gates(spec)
        _check_combinations(spec)
    except FieldError as exc:
        raise _located(exc, lines, source) from None
    return spec


def field_error(exc: FieldError, text: str, source: str = "<spec>") -> SpecError:
    """`exc`, raised for a field of the spec that `parse_spec` read from `text`, as a `SpecError`
    naming the field's YAML line."""
    lines: dict[tuple, int] = {}
    _index_lines(yaml.compose(text, Loader=yaml.SafeLoader), (), lines, source)
    return _located(exc, lines, source)


def _located(exc: FieldError, lines: dict[tuple, int], source: str) -> SpecError:
    path = tuple(exc.field.split("."))
    line = next(lines[path[:i]] for i in range(len(path), -1, -1) if path[:i] in lines)
    return SpecError(f"{source}:{line}: {exc.field}: {exc.message}")


GATE_VALUES = {  # the range of a constant gate `value`, by the gate's key
    "decay": (lambda x: 0 < x <= 1, "0 < value <= 1 (alpha, the share of the state kept)"),
    "eta": (lambda x: x > 0, "value > 0 (a step size)"),
    "momentum": (lambda x: 0 <= x <= 1, "0 <= value <= 1 (the share of the momentum kept)"),
    "delta": (lambda x: x > 0, "value > 0 (a threshold on the residual)"),
    "weight": (lambda x: x >= 0, "value >= 0 (the weight of a token's loss in the window)"),
}


def _check_gates(spec: Spec) -> None:
    """Each constant gate within the range its role allows."""
    for field, gate in spec.gates().items():
        within, allowed = GATE_VALUES[field.rsplit(".", 1)[1]]
        if gate.value is not None and not within(gate.value):
            raise FieldError(f"{field}.value", f"{gate.value!r} is not allowed; allowed: {allowed}")


def _check_combinations(spec: Spec) -> None:
    """Cross-axis rules that a single field cannot express."""
    mem = spec.memory
    _check_window(spec)
    if spec.learner.kind == "muon" and spec.learner.eta.shape == "channel":
        raise FieldError("learner.eta.shape", "'channel' is not allowed with learner.kind 'muon' "
                         "(the step scales the orthogonalised update NS_k(S_t) as a whole; a step "
                         "per channel would undo its orthogonality); allowed: 'head'")
    if mem.read_residual == "output" and not mem.residual:
        raise FieldError("memory.read_residual", "'output' is not allowed without memory.residual: "
                         "true (it moves the residual's skip connection onto the read); "
                         "allowed: 'input'")
    if mem.bias and mem.kind == "matrix":
        for field, gate in spec.gates().items():
            if gate.shape == "channel" and field != "bias.delta":
                raise FieldError(
                    f"{field}.shape",
                    "'channel' is not allowed with memory.bias on a matrix memory (the gate runs "
                    "along the memory's input channels, which the bias does not have); "
                    "allowed: 'head'",
                )
    if spec.memory.kind == "mlp":
        for field, gate in spec.gates().items():
            if gate.shape == "channel" and field != "bias.delta":
                raise FieldError(
                    f"{field}.shape",
                    "'channel' is not allowed with memory.kind 'mlp' (its layers have different "
                    "widths); allowed: 'head'",
                )


def _check_window(spec: Spec) -> None:
    """bias.window: the window fits in a chunk (its chunk step reaches back one chunk), its weight
    is per head, and a window of more than one token has one gradient per token: not with a lag
    token (two segments per chunk to reach back across) nor with grad_at 'retained' (each token's
    loss would be differentiated at every reading token's own point)."""
    window = spec.bias.window
    if window is None:
        return
    if window.size > spec.chunk_size:
        raise FieldError("bias.window.size", f"{window.size} is not allowed with chunk_size "
                         f"{spec.chunk_size} (a chunk reaches back into the previous chunk only); "
                         "allowed: 1 <= size <= chunk_size")
    if window.weight is not None and window.weight.shape == "channel":
        raise FieldError("bias.window.weight.shape", "'channel' is not allowed (the weight "
                         "scales a token's whole loss); allowed: 'head'")
    if window.size == 1:
        return
    if spec.lag_token:
        raise FieldError("bias.window.size", f"{window.size} is not allowed with lag_token: true "
                         "(the lag token splits each chunk in two, and the window would reach "
                         "back across both parts); allowed: 1, or lag_token: false")
    if spec.learner.grad_at == "retained":
        raise FieldError("learner.grad_at", f"'retained' is not allowed with bias.window.size "
                         f"{window.size} (each token's loss would be differentiated at the point of "
                         "every token whose window holds it); allowed: 'previous', or size 1")


def read_spec(path: str | Path) -> str:
    """The text of a spec file: UTF-8, at most MAX_SPEC_CHARS characters (else a SpecError)."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = f.read(4 * MAX_SPEC_CHARS + 1)  # UTF-8 takes at most 4 bytes a character
    except OSError as exc:
        raise SpecError(f"{path}: cannot read the spec: {exc.strerror}") from None
    if len(data) > 4 * MAX_SPEC_CHARS:
        raise SpecError(f"{path}:1: the spec has over {4 * MAX_SPEC_CHARS} bytes; allowed: at "
                        f"most {MAX_SPEC_CHARS} characters")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise SpecError(f"{path}:{line}: not UTF-8 text (byte {data[exc.start]:#04x} at offset "
                        f"{exc.start}); a spec is a YAML text file") from None
