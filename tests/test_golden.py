"""One generated module under review: gated DeltaNet's, rendered, equals tests/golden, so that a
change to the generated kernels shows in the diff of its commit.

After a deliberate change to what is generated, regenerate it with
    python -m mirasc compile gated_deltanet -o tests/golden
and review the diff."""

from __future__ import annotations

from pathlib import Path

from mirasc.catalog import resolve
from mirasc.codegen import render_module

GOLDEN = Path(__file__).resolve().parent / "golden" / "gated_deltanet.py"


def test_the_generated_gated_deltanet_module_is_the_reviewed_one():
    rendered = render_module(resolve("gated_deltanet"))
    assert rendered == GOLDEN.read_text(), (
        "the generated module changed: review it and regenerate tests/golden (this file's "
        "docstring has the command)")
