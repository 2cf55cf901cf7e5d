"""Specs by name: the shipped specs travel with the package, and every entry point (mirasc.compile,
the command line, MirasLayer, MirasConfig) takes a shipped name, a path or YAML text."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import mirasc
from mirasc.catalog import load_spec, resolve, shipped, spec_text
from mirasc.cli import app
from mirasc.errors import SpecError
from mirasc.layers import MirasLayer
from mirasc.lm import MirasConfig

ROOT = Path(__file__).resolve().parent.parent
SPEC_FILES = sorted((ROOT / "specs").glob("*.yaml"))


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MIRASC_CACHE_DIR", str(tmp_path / "cache"))


def test_every_spec_file_is_shipped_with_its_description():
    names = shipped()
    assert list(names) == [p.stem for p in SPEC_FILES]
    for path in SPEC_FILES:
        assert names[path.stem] == " ".join(load_spec(path).description.split())
        assert names[path.stem]


@pytest.mark.parametrize("form", ["name", "path", "Path", "text"])
def test_a_spec_by_name_path_or_text_is_the_same_spec(form):
    path = ROOT / "specs" / "gated_deltanet.yaml"
    source = {"name": "gated_deltanet", "path": str(path), "Path": path,
              "text": path.read_text()}[form]
    assert resolve(source) == load_spec(path)
    assert mirasc.compile(source).spec == load_spec(path)


def test_one_line_yaml_text_is_text():
    text = ("{name: tiny, memory: {kind: matrix}, bias: {kind: l2}, retention: {kind: none}, "
            "learner: {kind: gd, eta: {value: 0.5}}}")
    assert resolve(text).name == "tiny"


def test_an_unknown_name_lists_the_shipped_specs():
    with pytest.raises(SpecError, match=r"'monet': no shipped spec and no file of that name; "
                                        r"shipped specs: deltanet, .*moneta"):
        resolve("monet")


def test_bad_yaml_text_is_reported_as_text_not_echoed_as_a_path():
    with pytest.raises(SpecError) as caught:
        resolve("name: x\nmemory: {kind: matrix}\nbias: {kind: nope}\n")
    message = str(caught.value)
    assert message.startswith("<spec text>:3: bias")
    assert "memory: {kind: matrix}" not in message


def test_layer_and_config_take_a_shipped_name():
    layer = MirasLayer("simple_gla", hidden_size=16, num_heads=2)
    assert layer.spec == load_spec(ROOT / "specs" / "simple_gla.yaml")
    config = MirasConfig(spec="titans", hidden_size=16, num_heads=2)
    assert config.spec == (ROOT / "specs" / "titans.yaml").read_text()  # saved whole
    assert spec_text(config.spec)[0] == config.spec


def test_list_shows_the_shipped_specs():
    result = CliRunner().invoke(app, ["list"])
    assert result.exit_code == 0, result.output
    for name, description in shipped().items():
        assert f"  {name}" in result.stdout and description in result.stdout


def _outside(tmp_path: Path, monkeypatch) -> dict:
    """An environment that runs from an empty directory outside the repository, where only the
    installed package can supply specs and templates."""
    work = tmp_path / "empty"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return dict(cwd=work, env=env | {"MIRASC_CACHE_DIR": str(tmp_path / "cache")})


@pytest.mark.slow
def test_by_name_from_an_empty_directory(tmp_path, monkeypatch):
    where = _outside(tmp_path, monkeypatch)
    run = subprocess.run([sys.executable, "-c", "import mirasc; print(mirasc.compile('moneta'))"],
                         capture_output=True, text=True, timeout=300, **where)
    assert run.returncode == 0, run.stderr
    assert "moneta" in run.stdout
    mirasc_cli = shutil.which("mirasc", path=str(Path(sys.executable).parent))
    run = subprocess.run([mirasc_cli, "check", "gated_deltanet", "--length", "20"],
                         capture_output=True, text=True, timeout=300, **where)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "gated_deltanet: worst relative error" in run.stdout


@pytest.mark.parametrize("option", ["--length", "--heads", "--head-dim"])
def test_check_refuses_a_zero_size(option):
    result = CliRunner().invoke(app, ["check", "gated_deltanet", option, "0"])
    assert result.exit_code == 2
    assert f"Invalid value for '{option}'" in result.output
    assert "greater than or equal to 1" in result.output
