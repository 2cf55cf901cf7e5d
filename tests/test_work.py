"""`benchmarks.work`: a launch's dynamic instructions and bytes without a GPU. A small kernel is
compiled for sm_90 (in a child process: the tests' TRITON_INTERPRET would replace the
compiler) and one program of it interpreted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = """
import json, torch, triton, triton.language as tl
from benchmarks.work import compiled_afresh, loops, per_warp, run_program, sass_with_lines, split_loops
from mirasc.resources import compiling_for

@triton.jit
def kernel(x_ptr, w_ptr, y_ptr, N, B: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * B + tl.arange(0, B)
    acc = tl.zeros([B, B], tl.float32)
    for i in range(0, N):
        x = tl.load(x_ptr + rows[:, None] * B + tl.arange(0, B)[None, :] + i * 4)
        acc = tl.dot(x, tl.load(w_ptr + tl.arange(0, B)[:, None] * B + tl.arange(0, B)[None, :]), acc)
    tl.store(y_ptr + rows[:, None] * B + tl.arange(0, B)[None, :], acc, mask=rows[:, None] < 40)

@triton.jit
def blocked(x_ptr, y_ptr, N, BN: tl.constexpr):
    pid = tl.program_id(0)
    acc = tl.zeros([BN], tl.float32)
    for i in range(0, tl.cdiv(N, BN)):
        acc += tl.load(x_ptr + pid * N + i * BN + tl.arange(0, BN))
    tl.store(y_ptr + pid * BN + tl.arange(0, BN), acc)

x, w, y = torch.randn(64 * 16 + 64), torch.randn(16 * 16), torch.empty(64 * 16)
with compiling_for(90), compiled_afresh():
    compiled = kernel.warmup(x, w, y, 3, grid=(1,), B=16, num_warps=4)
sass = sass_with_lines(compiled.asm["cubin"])
out = {"loops": len([s for s in loops(sass) if s[0] != s[1]]), "split": split_loops(sass)}
for n in (3, 10):
    run = run_program(kernel, (x, w, y, n), {"B": 16}, (4,))
    out[n] = {"instructions": per_warp(sass, run), "bytes": run.bytes_moved,
              "tensors": sorted(run.tensors), "middle": int(y.view(4, -1)[2].abs().sum() > 0)}
from benchmarks.static import Launch, compile_launch, launch_work
launch = Launch(kernel, (x, w, y, 3), [{"B": 16, "num_warps": 4}, {"B": 16, "num_warps": 8}],
                [(4,), (4,)])
rows = compile_launch(launch, 90, 2)
out["instr"] = [launch_work(launch, [row])["warp_instr"] for row in rows]
out["picked"] = launch_work(launch, rows)["num_warps"]
rows[out["instr"].index(min(out["instr"]))]["spill_bytes"] = 8  # the cheaper one, made to spill
out["picked_unspilled"] = launch_work(launch, rows)["num_warps"]
# a configuration of narrower blocks, second in its launch's list, and the same one alone
narrow, wide = {"BN": 16, "num_warps": 4}, {"BN": 64, "num_warps": 4}
xb, yb = torch.randn(16 * 256), torch.empty(256)
both = Launch(blocked, (xb, yb, 256), [wide, narrow], [(4,), (16,)])
row = compile_launch(both, 90, 2)[1]
alone = Launch(blocked, (xb, yb, 256), [narrow], [(16,)])
for name, work in (("second", launch_work(both, [dict(row)])),
                   ("alone", launch_work(alone, [dict(row, config=0)]))):
    out[name] = {k: work[k] for k in ("warp_instr", "programs", "moved_mb")}
print(json.dumps(out))
"""


def test_loops_count_by_their_trips_and_bytes_by_their_lanes(tmp_path):
    """One program (the middle one of 4) of a loop of N trips, each loading a 16x16 fp32 tile
    of x and of w, then storing a 16x16 tile where its rows are below 40 (program 2: rows 32-47,
    so 8 rows): its bytes are exact, its instructions grow by the loop's body per trip, and it
    wrote the middle program's rows only."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env |= {"TRITON_CACHE_DIR": str(tmp_path / "triton"), "TRITON_DEFAULT_FP_FUSION": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    for name in ("first.py", "child.py"):  # the second finds the kernel in Triton's cache
        script = tmp_path / name  # Triton reads a kernel's source from its file
        script.write_text(CHILD)
        done = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    tile = 16 * 16 * 4
    for n in ("3", "10"):
        assert out[n]["bytes"] == int(n) * 2 * tile + 8 * 16 * 4, out
        assert out[n]["tensors"] == [0, 1, 2] and out[n]["middle"] == 1, out
    assert out["loops"] >= 1 and out["split"] == 0  # one loop per `for`, not unrolled
    grown = out["10"]["instructions"] - out["3"]["instructions"]
    assert grown > 0 and grown % 7 == 0, out  # 7 more trips of the same body
    # `benchmarks.static`'s row: of 4 and 8 warps the one that spills least, then runs fewest
    # warp-instructions
    cheaper, dearer = sorted(zip(out["instr"], (4, 8), strict=True))
    assert cheaper[0] < dearer[0] and out["picked"] == cheaper[1], out
    assert out["picked_unspilled"] == dearer[1], out
    # a configuration's blocks set its loops' trips and its grid, wherever it stands in the list
    assert out["second"] == out["alone"] and out["second"]["programs"] == 16, out
    assert out["second"]["moved_mb"] * 2**20 == 16 * 256 * 4 + 256 * 4, out
