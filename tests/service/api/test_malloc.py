"""The API gives large freed buffers back to the system (service.api.malloc)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

# In a process of its own: free one large block (glibc raises its threshold past the megabyte
# buffers), then hold and free 64 of them; print how much of them stays resident.
SCRIPT = """
import sys
import psutil
from service.api import malloc
if sys.argv[1] == "fixed":
    assert malloc.unmap_large_blocks()
rss = psutil.Process().memory_info
first = bytearray(4 * 2**20)
del first
base = rss().rss
held = [bytearray(2**20) for _ in range(64)]
for block in held:
    block[::4096] = b"x" * len(block[::4096])  # touch every page
del held
print((rss().rss - base) / 2**20)
"""


def kept_mib(mode: str) -> float:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True
    )
    return float(out.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_megabyte_buffers_leave_the_process() -> None:
    assert kept_mib("default") > 32  # glibc's own behaviour: kept in the heap
    assert kept_mib("fixed") < 8
