"""A compiled kernel's cubin read without a GPU: registers and spill stack per thread and its SASS,
by the cuobjdump that Triton ships; and the shared memory each target allows a block."""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

# Shared memory a block may opt into, in bytes, by compute capability (CUDA C++ Programming
# Guide, "Technical Specifications per Compute Capability").
SHARED_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448}


def _cuobjdump(cubin: bytes, flag: str) -> str:
    """What Triton's bundled cuobjdump prints for the cubin with `flag`."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(tool), flag, f.name], capture_output=True, text=True,
                              check=True).stdout


def resource_usage(cubin: bytes) -> tuple[int, int]:
    """REG and STACK of the cubin's kernel (registers and spill bytes per thread), as cuobjdump
    -res-usage prints them: no GPU needed."""
    usage = _cuobjdump(cubin, "-res-usage")
    found = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    if found is None:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{usage}")
    return int(found[1]), int(found[2])


def sass(cubin: bytes) -> tuple[int, int, str]:
    """`resource_usage` of the cubin's kernel and its SASS."""
    return *resource_usage(cubin), _cuobjdump(cubin, "-sass")
