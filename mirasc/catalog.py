"""The specs mirasc ships (package data `mirasc.specs`, the repository's specs/), and how a spec
source becomes a checked `Spec`: a shipped name ("moneta"), a path to a YAML file, or YAML text,
validated (`mirasc.spec`) and derived, so that its expressions are checked too (`mirasc.derive`)."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

import yaml

from mirasc.derive import derive
from mirasc.errors import FieldError, SpecError
from mirasc.spec import Spec, field_error, parse_spec, read_spec

SUFFIXES = (".yaml", ".yml")


def _folder():
    """specs/ ships inside the wheel as mirasc.specs; in a source tree imported directly (a script
    run from the repository root) it is the folder beside mirasc/."""
    try:
        return resources.files("mirasc.specs")
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "specs"


def shipped() -> dict[str, str]:
    """Each shipped spec's name and its one-line description, sorted by name."""
    found = {}
    for entry in sorted(_folder().iterdir(), key=lambda e: e.name):
        if entry.name.endswith(SUFFIXES):
            data = yaml.safe_load(entry.read_text())
            found[entry.name.rsplit(".", 1)[0]] = " ".join(str(data.get("description", "")).split())
    return found


def spec_text(source: str | Path) -> tuple[str, str]:
    """(YAML text, where it came from) of a spec source. A str is YAML text when it spans lines or
    holds a mapping's colon (and names no file), else a shipped spec's name, else a file's path."""
    if isinstance(source, Path):
        return read_spec(source), str(source)
    if "\n" in source or (":" in source and not source.endswith(SUFFIXES)
                          and not Path(source).is_file()):
        return source, "<spec text>"
    entry = _folder().joinpath(f"{source}.yaml")
    if re.fullmatch(r"\w+", source) and entry.is_file():
        return entry.read_text(), f"{source} (shipped)"
    if source.endswith(SUFFIXES) or Path(source).exists():
        return read_spec(Path(source)), source
    raise SpecError(f"{source!r}: no shipped spec and no file of that name; shipped specs: "
                    f"{', '.join(shipped())} (or give a .yaml path, or YAML text)")


def resolve(source: str | Path | Spec) -> Spec:
    """A checked `Spec` from itself, a shipped name, a YAML file or YAML text."""
    if isinstance(source, Spec):
        return source
    text, where = spec_text(source)
    return checked_spec(text, source=where)


def load_spec(path: str | Path) -> Spec:
    """Read and check a spec file."""
    return checked_spec(read_spec(path), source=str(path))


def checked_spec(text: str, source: str = "<spec>") -> Spec:
    """Validate YAML text into a `Spec` and derive it (its expressions are parsed and
    differentiated there), raising `SpecError` with the field's YAML line on a problem."""
    spec = parse_spec(text, source)
    try:
        derive(spec)
    except FieldError as exc:
        raise field_error(exc, text, source) from None
    return spec
