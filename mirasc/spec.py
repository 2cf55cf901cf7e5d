"""The spec language: a YAML file with four axes (memory, bias, retention, learner) plus chunking.

`load_spec(path)` parses the YAML, validates it into frozen pydantic models and raises `SpecError`
with the file, the YAML line, the dotted field, the bad value and what is allowed.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class SpecError(ValueError):
    """A spec that cannot be compiled; the message names the file, line, field and what is allowed."""


class FieldError(Exception):
    """A problem with one field of an otherwise well-formed spec (turned into a `SpecError`)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Gate(_Strict):
    """A per-token gate: an op input (`value` unset) of shape [B,T,H] (`head`) or [B,T,H,D]
    (`channel`), or a constant `value` fixed by the spec."""

    shape: Literal["head", "channel"] = "head"
    value: float | None = None

    @property
    def is_input(self) -> bool:
        return self.value is None


# ---- memory ---------------------------------------------------------------------------------


class LayerNorm(_Strict):
    """LN(y) = (y - mean) / sqrt(var + eps) over the value channels, times ln_weight plus ln_bias
    (per-head op inputs [H, Dv]) when `affine`."""

    affine: bool = False
    eps: float = Field(1e-5, gt=0)


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
    residual: bool = False
    layer_norm: bool | LayerNorm = False
    bias: bool = False
    read_residual: Literal["input", "output"] = "input"


class VectorMemory(_Memory):
    """M(x) = [x +] [LN](w * x [+ b]), a diagonal memory, w in R^d per head (needs dk == dv)."""

    kind: Literal["vector"]
    residual: bool = False
    layer_norm: bool | LayerNorm = False
    bias: bool = False
    read_residual: Literal["input", "output"] = "input"


class MLPMemory(_Memory):
    """M(x) = [x +] [LN](W_d act(... act(W_1 x + b_1)) + b_d) (biases with `bias`), hidden width
    expansion * dk."""

    kind: Literal["mlp"]
    depth: int = Field(2, ge=2, le=8)
    expansion: int = Field(4, ge=1, le=16)
    activation: Literal["gelu", "silu", "relu", "tanh"] = "gelu"
    residual: bool = True
    layer_norm: bool | LayerNorm = True
    bias: bool = False
    read_residual: Literal["input", "output"] = "input"


Memory = Annotated[MatrixMemory | VectorMemory | MLPMemory, Field(discriminator="kind")]


# ---- attentional bias -----------------------------------------------------------------------


class _Smoothing(_Strict):
    smooth: bool = False
    temperature: float = Field(10.0, gt=0)
    eps: float = Field(1e-6, gt=0)


class DotProductBias(_Strict):
    """l = -<M(k), v>: the Hebbian rule (linear attention, RetNet, Mamba2, GLA)."""

    kind: Literal["dot_product"]


class L2Bias(_Strict):
    """l = 1/2 ||r||^2: the delta rule."""

    kind: Literal["l2"]


class LpBias(_Smoothing):
    """l = ||r||_p^p (Moneta), gradient p sign(r)|r|^(p-1), smoothed by default."""

    kind: Literal["lp"]
    p: float = Field(ge=1)
    smooth: bool = True


class HuberBias(_Smoothing):
    """Huber loss with threshold delta: `coordinate` (clip r), `norm` (H(||r||)), or `switch`
    (Yaad: the l2 gradient while ||r|| <= delta, else delta * sign(r))."""

    kind: Literal["huber"]
    variant: Literal["coordinate", "norm", "switch"] = "coordinate"
    delta: Gate


class RobustBias(_Strict):
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
    params: dict[str, float] = Field(default_factory=dict)
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
    q: float = Field(gt=1)
    decay: Gate | None = None
    scope: Literal["matrix", "row", "column"] = "matrix"
    link: Literal["scale", "pnorm"] = "scale"
    eps: float = Field(1e-6, gt=0)


class KLRetention(_Strict):
    """Z_t = alpha_t Z_{t-1} - update; W_t = c * softmax(Z_t) over `axis` (Memora, eq. 27)."""

    kind: Literal["kl"]
    decay: Gate | None = None
    axis: Literal["row", "column", "matrix"] = "row"
    scale: float = Field(1.0, gt=0)


class ElasticNetRetention(_Strict):
    """W_t = S_gamma(alpha_t W_{t-1} - update) (`form: proximal`, eq. 22) or
    A_t = alpha_t A_{t-1} - update, W_t = S_gamma(A_t) (`form: dual`, eq. 23)."""

    kind: Literal["elastic_net"]
    gamma: float = Field(gt=0)
    decay: Gate | None = None
    form: Literal["proximal", "dual"] = "proximal"
    smooth: bool = False


class MirrorRetention(_Strict):
    """Mirror descent with a user potential f: Z_t = alpha_t Z_{t-1} - update, W_t = (f')^-1(Z_t)."""

    kind: Literal["mirror"]
    potential: str
    params: dict[str, float] = Field(default_factory=dict)
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


Learner = Annotated[GDLearner | MomentumLearner, Field(discriminator="kind")]


# ---- the spec -------------------------------------------------------------------------------


class Spec(_Strict):
    """One memory layer: the four Miras axes plus how training chunks the sequence."""

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    description: str = ""
    memory: Memory
    bias: Bias
    retention: Retention
    learner: Learner
    chunk_size: int = Field(64, ge=1, le=1024)
    lag_token: bool = False

    def gates(self) -> dict[str, Gate]:
        """Every gate of the spec by dotted field name."""
        found = {}
        for axis in ("bias", "retention", "learner"):
            for key in ("delta", "decay", "eta", "momentum"):
                gate = getattr(getattr(self, axis), key, None)
                if gate is not None:
                    found[f"{axis}.{key}"] = gate
        return found

    def digest(self) -> str:
        """A stable hash of the validated spec (the compile cache key)."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---- loading with line numbers --------------------------------------------------------------


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
    if kind == "value_error":
        return f"{source}:{line}: {message}"
    return f"{source}:{line}: {field}: {error['input']!r} is not allowed: {message}"


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
    """Validate YAML text into a `Spec`, raising `SpecError` on the first problems found."""
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
    from mirasc.derive import derive  # expressions are parsed and differentiated there

    try:
        _check_combinations(spec)
        derive(spec)
    except FieldError as exc:
        path = tuple(exc.field.split("."))
        line = next(lines[path[:i]] for i in range(len(path), -1, -1) if path[:i] in lines)
        raise SpecError(f"{source}:{line}: {exc.field}: {exc.message}") from None
    return spec


def _check_combinations(spec: Spec) -> None:
    """Cross-axis rules that a single field cannot express."""
    mem = spec.memory
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


def load_spec(path: str | Path) -> Spec:
    """Read and validate a spec file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError(f"{path}: cannot read the spec: {exc.strerror}") from None
    return parse_spec(text, source=str(path))
