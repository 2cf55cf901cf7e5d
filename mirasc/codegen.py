"""Code generation: render a spec's derivation into the source of its Python module.

The same spec always renders the same bytes (sorted literals, deterministic printing)."""

from __future__ import annotations

import pprint
from importlib import resources

import jinja2
import sympy as sp

import mirasc
from mirasc.derive import DELTA, RNORM, R, V, derive
from mirasc.expr import torch_source
from mirasc.reference import RNORM_EPS
from mirasc.spec import Spec

_NAMES = {R: "r", V: "v", RNORM: "rnorm", DELTA: "delta"}


def _environment() -> jinja2.Environment:
    templates = resources.files("mirasc.templates")
    return jinja2.Environment(
        loader=jinja2.FunctionLoader(lambda name: templates.joinpath(name).read_text()),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )


def render_module(spec: Spec) -> str:
    """The Python source of the module that `mirasc compile` writes for `spec`."""
    d = derive(spec)
    template = _environment().get_template("reference_module.py.j2")
    return template.render(
        name=spec.name,
        digest=spec.digest(),
        version=mirasc.__version__,
        spec_data=pprint.pformat(spec.model_dump(mode="json"), width=96, sort_dicts=True),
        elem=torch_source(d.bias.elem, _NAMES),
        norm=torch_source(d.bias.norm, _NAMES),
        elem_text=sp.sstr(d.bias.elem),
        norm_text=sp.sstr(d.bias.norm),
        rnorm_eps=repr(RNORM_EPS),
    )
