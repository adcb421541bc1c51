"""Large freed buffers go back to the system at once (glibc's malloc).

glibc serves an allocation of 128 KiB or more with a mapping of its own and unmaps it when it is
freed, but each time such a block is freed it raises that threshold to the block's size (up to
32 MiB). After the first large request the API's megabyte buffers (a body, the parser's segments,
a job's items) come from the heap instead, and a heap keeps what is freed in its middle: the
process's resident memory then holds several bodies' worth that nothing uses, and the next large
body grows it again. Setting the threshold once (``mallopt(M_MMAP_THRESHOLD)``, which also turns
the raising off) keeps the API's memory near what it holds: a body refused or a job stored gives
its buffers back when it is done.

Failure semantics: on a C library other than glibc (musl, macOS) nothing is changed and
:func:`unmap_large_blocks` says so by returning False.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("imagebatch.api")

# mallopt's parameter number for the mmap threshold (glibc's malloc.h).
M_MMAP_THRESHOLD = -3
# glibc's own starting threshold, kept fixed.
THRESHOLD_BYTES = 128 * 1024


def unmap_large_blocks(threshold: int = THRESHOLD_BYTES) -> bool:
    """Serve every allocation of ``threshold`` bytes or more with its own mapping, returned to
    the system when freed. True when glibc took the setting."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 - present in glibc only
    except (OSError, AttributeError, TypeError):
        log.debug("not glibc: large blocks stay as the C library keeps them")
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, threshold) == 1
