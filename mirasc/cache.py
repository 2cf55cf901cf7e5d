"""The compile cache: a spec's generated module written under `cache_dir()` (keyed by the spec's
name and digest, written atomically) and run once per process; `compile`, a spec source's op."""

from __future__ import annotations

import builtins
import linecache
import os
import secrets
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from mirasc.spec import Spec

if TYPE_CHECKING:
    from mirasc.op import MirasOp


class CacheError(OSError):
    """The compile cache cannot be written or read; the message names the directory and how to
    choose another."""


def cache_dir() -> Path:
    """Where compiled modules live: $MIRASC_CACHE_DIR, else ~/.cache/mirasc."""
    return Path(os.environ.get("MIRASC_CACHE_DIR", Path.home() / ".cache" / "mirasc"))


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so readers see the old or the new file, whole.
    The file gets the permissions the umask gives any file the user writes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def module_path(spec: Spec) -> Path:
    return cache_dir() / f"{spec.name}-{spec.digest()}.py"


def run_module(path: Path, text: str) -> ModuleType:
    """Run `text` as the module of file `path`: the text itself is compiled, never bytecode
    beside the file nor the file read again, and it is what tracebacks and `inspect` (through
    which Triton reads a kernel's source) show for `path`."""
    name = f"mirasc_generated.{path.stem.replace('-', '_')}"
    module = ModuleType(name)
    module.__file__ = str(path)
    linecache.cache[str(path)] = (len(text), None, text.splitlines(keepends=True), str(path))
    sys.modules[name] = module  # in place while it runs, as an import would have it
    try:
        exec(builtins.compile(text, str(path), "exec"), module.__dict__)
    except BaseException:
        del sys.modules[name]
        raise
    return module


_written: set[Path] = set()  # cache files this process found holding, or wrote, the rendered text
# by file name (spec name and digest): run once per process, so every cache directory's op of a
# spec is the same object, on the same custom ops (`launch.ChunkKernels`)
_modules: dict[str, ModuleType] = {}


def load_module(spec: Spec) -> ModuleType:
    """The generated module of `spec`, from the cache: rendered, written unless the cached file
    holds the same text, and run from that rendered text (once per process)."""
    from mirasc.codegen import render_module

    return _load(module_path(spec), lambda: render_module(spec))


def load_step_module(spec: Spec) -> ModuleType:
    """The module of `spec`'s Triton decode step (`codegen.render_step_module`), cached beside
    its chunk module like `load_module`'s."""
    from mirasc.codegen import render_step_module

    return _load(cache_dir() / f"{spec.name}-{spec.digest()}-step.py",
                 lambda: render_step_module(spec))


def _load(target: Path, render) -> ModuleType:
    """The module of file `target` holding the text `render()` returns (see `load_module`)."""
    if target in _written:
        return _modules[target.stem]
    text = render()
    try:
        if not target.exists() or target.read_text() != text:
            write_atomic(target, text)
    except OSError as exc:
        raise CacheError(f"cannot use the compile cache {cache_dir()}: {exc.strerror or exc} "
                         f"({exc.filename or target}); set MIRASC_CACHE_DIR to a writable "
                         "directory") from None
    if target.stem not in _modules:
        _modules[target.stem] = run_module(target, text)
    _written.add(target)
    return _modules[target.stem]


def compile(source: str | Path | Spec) -> MirasOp:  # noqa: A001 - the public verb is `mirasc.compile`
    """Compile a spec (a shipped name, a YAML file, YAML text or a `Spec`; cached by its hash)
    and return its op."""
    from mirasc.catalog import resolve

    return load_module(resolve(source)).op
