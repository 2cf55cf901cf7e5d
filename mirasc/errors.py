"""How a bad spec is reported, and the bound on powers that the spec's fields, its expressions and
their derivation all keep: shared by `spec`, `expr` and `derive` without importing one another."""

from __future__ import annotations

MAX_EXPONENT = 64  # the largest power a spec may take: lp.p, lq.q and ** in expressions


class SpecError(ValueError):
    """A spec that cannot be compiled; the message names the file, line, field and what is allowed."""


class FieldError(Exception):
    """A problem with one field of an otherwise well-formed spec (turned into a `SpecError`)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
