"""The `mirasc` command line: list, explain, compile, check, and clean errors for bad specs."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import oracle
import pytest
import torch
from typer.testing import CliRunner

from mirasc.catalog import load_spec
from mirasc.check import branch_shares, cover_branches, random_inputs
from mirasc.cli import app
from mirasc.codegen import render_module
from mirasc.derive import derive
from mirasc.op import MirasOp

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs"
runner = CliRunner()

KINDS = {
    "memory": ["matrix", "vector", "mlp"],
    "bias": ["dot_product", "l2", "lp", "huber", "robust", "expression"],
    "retention": ["none", "l2", "lq", "kl", "elastic_net", "mirror"],
    "learner": ["gd", "momentum", "muon"],
}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MIRASC_CACHE_DIR", str(tmp_path / "cache"))


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_list_names_every_axis_and_kind():
    result = invoke("list")
    assert result.exit_code == 0, result.output
    out = result.stdout
    sections = re.split(r"^(memory|bias|retention|learner):$", out, flags=re.M)
    found = dict(zip(sections[1::2], sections[2::2], strict=True))
    assert list(found) == list(KINDS)
    for axis, kinds in KINDS.items():
        listed = re.findall(r"^  (\w+) ", found[axis], flags=re.M)
        assert listed == kinds, (axis, listed)
    for field in ("fields: residual, layer_norm", "fields: depth, expansion", "fields: eta, grad_at"):
        assert field in out


def test_explain_moneta_shows_lp_gradient_and_lq_normalisation():
    result = invoke("explain", SPECS / "moneta.yaml")
    assert result.exit_code == 0, result.output
    out = result.stdout
    grad = next(line for line in out.splitlines() if "g = dl/dr" in line)
    assert "tanh" in grad and re.search(r"\b3\*", grad), grad  # p sign(r) |r|^(p-1), p = 3
    assert "||A||_4" in out
    assert "moneta" in out and "lq" in out


def test_explain_yaad_shows_the_huber_switch():
    result = invoke("explain", SPECS / "yaad.yaml")
    assert result.exit_code == 0, result.output
    grad = next(line for line in result.stdout.splitlines() if "g = dl/dr" in line)
    assert "Piecewise" in grad and "delta" in grad and "rnorm" in grad, grad


def test_explain_memora_shows_softmax():
    result = invoke("explain", SPECS / "memora.yaml")
    assert result.exit_code == 0, result.output
    retention = next(line for line in result.stdout.splitlines() if line.startswith("retention"))
    assert "kl" in retention and "softmax" in retention, retention


def test_explain_latex():
    result = invoke("explain", SPECS / "moneta.yaml", "--latex")
    assert result.exit_code == 0, result.output
    assert "\\tanh" in result.stdout
    plain = invoke("explain", SPECS / "moneta.yaml").stdout
    assert "\\tanh" not in plain
    result = invoke("explain", SPECS / "yaad.yaml", "--latex")
    assert result.exit_code == 0, result.output
    assert "\\begin{cases}" in result.stdout and "Piecewise" not in result.stdout


def test_compile_writes_an_importable_module(tmp_path):
    out = tmp_path / "out"
    result = invoke("compile", SPECS / "gated_deltanet.yaml", "-o", out)
    assert result.exit_code == 0, result.output
    target = out / "gated_deltanet.py"
    assert str(target) in result.stdout
    spec = load_spec(SPECS / "gated_deltanet.yaml")
    assert target.read_text() == render_module(spec)
    assert [p.name for p in out.iterdir()] == ["gated_deltanet.py"]  # no temporary file left
    loader = importlib.util.spec_from_file_location("cli_compiled_gated_deltanet", target)
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    op = module.op
    assert isinstance(op, MirasOp) and op.spec == spec
    inputs = random_inputs(op, batch=1, length=9, heads=2, dk=5, dv=4)
    o, final = op(**inputs, output_final_state=True)
    ref_o, ref_final = op.reference(**inputs, output_final_state=True)
    assert o.shape == (1, 9, 2, 4) and final[0].shape == (1, 2, 4, 5)
    torch.testing.assert_close(o, ref_o, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final[0], ref_final[0], rtol=1e-10, atol=1e-10)


def test_python_m_mirasc_runs_the_command_line(tmp_path):
    """`python -m mirasc` is the `mirasc` command: --help, and compile -o writing the module."""
    env = os.environ | {"MIRASC_CACHE_DIR": str(tmp_path / "cache")}

    def run(*args):
        return subprocess.run([sys.executable, "-m", "mirasc", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)

    shown = run("--help")
    assert shown.returncode == 0, shown.stderr
    assert "compile" in shown.stdout and "explain" in shown.stdout
    out = tmp_path / "out"
    written = run("compile", "gated_deltanet", "-o", str(out))
    assert written.returncode == 0, written.stderr
    target = out / "gated_deltanet.py"
    assert f"wrote {target}" in written.stdout
    assert target.read_text() == render_module(load_spec(SPECS / "gated_deltanet.yaml"))


def test_python_m_mirasc_check_runs_the_kernels_in_a_fresh_process(tmp_path):
    """Without a GPU, `check` turns on Triton's interpreter before Triton is imported (the
    parent's TRITON_INTERPRET, set by conftest, is not passed on)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["MIRASC_CACHE_DIR"] = str(tmp_path / "cache")
    run = subprocess.run([sys.executable, "-m", "mirasc", "check", "deltanet", "--length", "9",
                          "--head-dim", "6"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert "deltanet: worst relative error" in run.stdout and "triton backend" in run.stdout


def test_check_prints_every_tensor():
    result = invoke("check", SPECS / "deltanet.yaml", "--length", "9", "--head-dim", "6")
    assert result.exit_code == 0, result.output
    rows = {}
    for line in result.stdout.splitlines():
        match = re.match(r"^(\S+)\s+(\S+)\s+(\S+)\s+(ok|FAIL)$", line)
        if match:
            rows[match[1]] = (float(match[2]), match[4])
    expected = {"o", "final_state[0]", "dq", "dk", "dv", "deta", "dinitial_state[0]"}
    assert set(rows) == expected, result.stdout
    assert all(status == "ok" and err <= 1e-5 for err, status in rows.values()), rows
    assert "deltanet: worst relative error" in result.stdout
    assert "T=9" in result.stdout


def test_check_rejects_an_unknown_dtype():
    result = invoke("check", SPECS / "deltanet.yaml", "--dtype", "float8")
    assert result.exit_code == 2
    assert "--dtype" in result.stderr and "bfloat16" in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_check_half_inputs_against_the_precision_table(dtype):
    """The torch path (and in the interpreter, for float16, the kernels) on half inputs against
    the float64 reference of the same rounded inputs, within docs/kernels.md's bound."""
    result = invoke("check", SPECS / "gated_deltanet.yaml", "--dtype", dtype, "--length", "21",
                    "--head-dim", "8")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    header = lines[0].split()
    interpreted = dtype == "float16" and not torch.cuda.is_available()
    runs = ["torch path"] + (["kernels"] if interpreted else [])
    assert lines[0].split("  ")[0].strip() == "tensor" and header[-1] == "bound"
    assert [r for r in runs if r in lines[0]] == runs
    bound = {"bfloat16": 1e-2, "float16": 2e-3}[dtype]
    rows = {}
    for line in lines[1:]:
        match = re.match(r"^(\S+)\s+((?:\S+\s+)+)(\S+)\s+(ok|FAIL)$", line)
        if match:
            rows[match[1]] = ([float(x) for x in match[2].split()], float(match[3]), match[4])
    assert set(rows) == {"o", "final_state[0]", "dq", "dk", "dv", "dlog_alpha", "deta",
                         "dinitial_state[0]"}, result.stdout
    for name, (errors, shown_bound, status) in rows.items():
        assert len(errors) == len(runs) and shown_bound == bound and status == "ok", name
        assert all(err <= bound for err in errors), (name, errors)
    assert rows["o"][0][0] > 1e-5  # the inputs were rounded to half, and the path ran in half
    assert f"within the precision table's {bound:g} for {dtype}" in result.stdout
    if not interpreted:
        assert "kernels: not run" in result.stdout


def test_help_lists_each_command_with_a_whole_sentence():
    from typer.main import get_command

    group = get_command(app)
    for columns in ("60", "120"):
        shown = runner.invoke(app, ["--help"], env={"COLUMNS": columns, "TERMINAL_WIDTH": columns})
        assert shown.exit_code == 0, shown.output
        flat = " ".join(re.sub(r"[│╭╮╰╯─]", " ", shown.stdout).split())
        for name, command in group.commands.items():
            summary = command.short_help
            assert summary and summary.endswith(".") and summary.count(". ") == 0, name
            assert f"{name} {summary}" in flat, (name, summary, shown.stdout)
        commands = shown.stdout.split("Commands", 1)[1]
        assert "..." not in commands and "…" not in commands  # nothing truncated


def test_explain_latex_renders_every_line():
    lines = {}
    for spec in ("moneta", "titans", "memora"):
        out = invoke("explain", SPECS / f"{spec}.yaml", "--latex").stdout
        lines[spec] = {line[:12].strip(): line[12:] for line in out.splitlines()
                       if line[:12].strip() in ("memory", "retention", "learner", "output")}
    assert "\\operatorname{LN}(W_{2}\\,\\operatorname{GELU}(W_{1} x))" in lines["moneta"]["memory"]
    assert "\\alpha_t A_{t-1}" in lines["moneta"]["retention"]
    assert "\\|A\\|_{4}^{2}" in lines["moneta"]["retention"]
    assert lines["moneta"]["learner"].strip() == "U_t = \\eta_t \\nabla_t"
    assert "S_t = m_t S_{t-1} + \\eta_t \\nabla_t" in lines["titans"]["learner"]
    assert "\\operatorname{softmax}(Z)" in lines["memora"]["retention"]
    assert lines["titans"]["output"].strip() == "o_t = M_{W_t}(q_t)"
    plain = invoke("explain", SPECS / "moneta.yaml").stdout
    assert "\\" not in "".join(line for line in plain.splitlines()
                               if line.startswith(("memory", "retention", "learner")))


def test_resources_prints_no_triton_fusion_notice(tmp_path):
    """`mirasc resources` compiles for sm_90 with Triton (not its interpreter), in a fresh Triton
    cache, without Triton 3.9's notice that TRITON_DEFAULT_FP_FUSION is unset."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "TRITON_DEFAULT_FP_FUSION")}
    env |= {"MIRASC_CACHE_DIR": str(tmp_path / "cache"), "TRITON_CACHE_DIR": str(tmp_path / "t")}
    run = subprocess.run([sys.executable, "-m", "mirasc", "resources", "linear_attention",
                          "--first", "--kernels", "fwd_stage", "--head-dim", "16"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert re.search(r"^fwd_stage\s+2\s+1\s+\d+", run.stdout, flags=re.M), run.stdout
    assert "TRITON_DEFAULT_FP_FUSION" not in run.stderr + run.stdout


BAD_SPEC = """\
name: broken
memory: {kind: matrix}
bias: {kind: l2}
retention: {kind: none}
learner:
  kind: gd
  etta: {shape: head}
chunk_size: 16
"""


@pytest.mark.parametrize("command", [["explain"], ["explain", "--latex"], ["compile", "-o", "OUT"],
                                     ["check"]])
def test_bad_spec_exits_2_with_file_and_line(command, tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text(BAD_SPEC)
    out = tmp_path / "out"
    args = [command[0], path, *(str(out) if a == "OUT" else a for a in command[1:])]
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)  # a clean exit, not an exception
    assert "Traceback" not in result.output
    assert f"{path}:7:" in result.stderr, result.stderr  # the line of the typo
    assert "etta" in result.stderr and "eta" in result.stderr.replace("etta", "")
    assert not out.exists()  # compile wrote nothing


def test_missing_spec_file_is_a_clean_error(tmp_path):
    result = invoke("explain", tmp_path / "nowhere.yaml")
    assert result.exit_code == 2
    assert isinstance(result.exception, SystemExit)
    assert "nowhere.yaml" in result.stderr


@pytest.mark.parametrize("command", [["check"], ["resources"], ["precompile"]])
def test_unusable_cache_exits_2_naming_the_directory(command, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("MIRASC_CACHE_DIR", str(blocker / "cache"))
    result = invoke(*command, SPECS / "deltanet.yaml")
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    assert result.stderr.startswith(f"error: cannot use the compile cache {blocker / 'cache'}: ")
    assert "set MIRASC_CACHE_DIR to a writable directory" in result.stderr


def test_compile_to_an_unwritable_directory_exits_2(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = invoke("compile", SPECS / "deltanet.yaml", "-o", blocker / "out")
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    assert result.stderr.startswith(f"error: cannot write {blocker / 'out' / 'deltanet.py'}: ")
    assert "--out" in result.stderr


@pytest.mark.parametrize(("content", "hint"), [
    (re.sub(r"(?m)^description: .*$", 'description: "bad \\\\ud800 text"',
            (SPECS / "deltanet.yaml").read_text()).encode(),
     "description: '\\ud800' at character 4 is not Unicode text"),
    (b"name: x\n\xff\xfe binary", "not UTF-8 text (byte 0xff at offset 8)"),
])
def test_explain_refuses_text_that_is_not_unicode(content, hint, tmp_path):
    path = tmp_path / "odd.yaml"
    path.write_bytes(content)
    result = invoke("explain", path)
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    assert hint in result.stderr, result.stderr


def test_check_draws_a_threshold_on_both_sides_and_prints_the_shares(tmp_path):
    """The norm-Huber threshold compares delta with ||r||, which the usual delta range (0.05-1)
    never reaches here: the check redraws delta across the residual norms it meets."""
    path = tmp_path / "huber_norm.yaml"
    path.write_text("name: huber_norm\nmemory: {kind: matrix}\n"
                    "bias: {kind: huber, variant: norm, delta: {}}\n"
                    "retention: {kind: l2, decay: {}}\nlearner: {kind: gd, eta: {}}\n"
                    "chunk_size: 8\n")
    result = invoke("check", path, "--length", "19", "--head-dim", "6")
    assert result.exit_code == 0, result.output
    match = re.search(r"^where\(delta >= rnorm, \.\.\.\) in g: branches taken by ([\d.]+)% / "
                      r"([\d.]+)% of the residual entries$", result.stdout, flags=re.M)
    assert match, result.stdout
    inside, outside = float(match[1]), float(match[2])
    assert inside >= 10 and outside >= 10 and abs(inside + outside - 100) < 0.2


def test_cover_branches_reaches_yaads_quadratic_branch():
    """The usual delta draw (0.05-1) stays under ||r|| > 1: Yaad's quadratic branch takes under
    10 % of the entries; redrawn, each branch takes 20-80 %, as the second oracle counts too."""
    op = MirasOp(derive(load_spec(SPECS / "yaad.yaml")))  # the reference alone
    inputs = random_inputs(op, length=37, seed=2)
    (inside, _), = branch_shares(op, inputs).values()
    assert inside < 0.1
    covered = cover_branches(op, inputs)
    assert set(covered) == set(inputs) and covered["delta"].shape == inputs["delta"].shape
    assert all(torch.equal(covered[k], inputs[k]) for k in ("q", "k", "v", "eta"))
    (inside, outside), = branch_shares(op, covered).values()
    assert inside >= 0.2 and outside >= 0.2
    tally = oracle.Tally()
    with torch.no_grad():
        oracle.run(op.spec, **covered, chunk_size=op.oracle_chunk_size, tally=tally)
    assert 0.2 <= tally.shares()["yaad ||r|| <= delta"] <= 0.8
