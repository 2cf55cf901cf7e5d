"""Start-up cost: seconds until `import mirasc` returns and until `mirasc --help` has printed,
each a fresh process (median of repeats); torch, sympy and Triton load only when first needed."""

from __future__ import annotations

import shutil
import subprocess
import sys

from benchmarks.common import median_times

COMMANDS = {"import mirasc": [sys.executable, "-c", "import mirasc"],
            "mirasc --help": [shutil.which("mirasc") or "mirasc", "--help"],
            "import mirasc, torch": [sys.executable, "-c", "import mirasc, torch"]}


def benchmark(repeats: int) -> list[dict]:
    """One row per command: median wall and CPU seconds of a fresh process running it."""
    rows = []
    for label, command in COMMANDS.items():
        wall, _ = median_times(lambda c=command: subprocess.run(c, check=True, capture_output=True),
                               repeats)
        rows.append({"command": label, "seconds": wall})
    return rows


def report(rows: list[dict], repeats: int, env: str) -> str:
    lines = [f"start-up, median of {repeats} fresh processes ({env})"]
    lines += [f"  {row['command']:<22} {row['seconds']:.3f} s" for row in rows]
    return "\n".join(lines)
