"""Durable writes for local storage: directory syncs shared between threads, direct I/O.

A file is durable once fsynced; its name only once the directory holding it has been synced
after the rename. Thousands of images land in one directory from a pool of threads, so
:class:`DirectorySync` lets the threads that renamed into one directory at about the same time
share one sync (a group commit) instead of each syncing it in turn. :class:`DirectWrites`
writes a whole object around the page cache.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import threading
from dataclasses import dataclass
from pathlib import Path


class DirectorySync:
    """fsync of a directory, shared by the threads that renamed into it at about the same time.

    Thousands of images land in one ``images/`` directory, many at once from a thread pool;
    each rename is durable once the directory has been synced *after* it. A thread takes a
    ticket after its rename; one fsync that starts after a ticket was taken covers that ticket,
    so threads arriving while one fsync runs wait for the next one and share it (group commit)
    instead of each syncing the same directory in turn.
    """

    @dataclass
    class _State:
        cond: threading.Condition
        tickets: int = 0
        synced: int = 0
        running: bool = False
        users: int = 0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._dirs: dict[Path, DirectorySync._State] = {}

    def sync(self, directory: Path) -> None:
        with self._lock:
            state = self._dirs.get(directory)
            if state is None:
                state = self._dirs[directory] = self._State(threading.Condition())
            state.users += 1
        try:
            self._sync(directory, state)
        finally:
            with self._lock:
                state.users -= 1
                if state.users == 0:
                    del self._dirs[directory]

    @staticmethod
    def _sync(directory: Path, state: DirectorySync._State) -> None:
        with state.cond:
            state.tickets += 1
            ticket = state.tickets
            while state.synced < ticket:
                if not state.running:
                    state.running = True
                    covered = state.tickets
                    break
                state.cond.wait()
            else:
                return
        ok = False
        try:
            fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            ok = True
        finally:
            with state.cond:
                state.running = False
                if ok:
                    state.synced = max(state.synced, covered)
                state.cond.notify_all()


DIR_SYNC = DirectorySync()


_O_DIRECT = getattr(os, "O_DIRECT", 0)  # Linux, some BSDs; 0 elsewhere: never direct


class DirectWrites:
    """Whole objects written with direct I/O (``O_DIRECT``), around the page cache.

    Collect writes gigabytes of images that nobody reads back soon. Through the page cache each
    byte is copied into a fresh cache page first (on a VM whose host backs guest memory lazily,
    a page fault on the host each; in a container, memory charged to it), evicting pages other
    processes use, then written back and fsynced; on the VM of bench/RESULTS.md that copy was a
    third of collect's CPU. Direct I/O hands the device the bytes from a buffer of the writing
    thread's own, reused from image to image (at most :attr:`PIECE` bytes resident a thread).

    Direct I/O wants the memory, the length and the file offset aligned to the device's block:
    each piece of up to :attr:`PIECE` bytes is copied into the thread's page-aligned buffer,
    zero-padded to :attr:`BLOCK` and written; the file is then cut back to the data's length.
    Where the filesystem refuses direct I/O (tmpfs before Linux 6.6, some FUSE filesystems:
    ``EINVAL``), the object is written through the page cache and this instance stops trying.
    The caller still fsyncs: a direct write may sit in the device's cache, and the file's size
    and extents are metadata.
    """

    BLOCK = 4096  # covers the logical block of every disk and filesystem in use (512 or 4096)
    PIECE = 4 * 1024 * 1024  # a thread's buffer: most images are written in one piece

    def __init__(self) -> None:
        self.enabled = bool(_O_DIRECT)
        self._local = threading.local()

    def open(self, path: Path) -> int:
        """``path`` (an existing, empty temp file) opened for writing, directly if it can be."""
        if self.enabled:
            try:
                return os.open(path, os.O_WRONLY | _O_DIRECT)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self.enabled = False
        return os.open(path, os.O_WRONLY)

    def write(self, fd: int, data: bytes | memoryview) -> None:
        """All of ``data`` into ``fd`` from offset 0 (``fd`` from :meth:`open`)."""
        view = memoryview(data).cast("B")
        if not fcntl.fcntl(fd, fcntl.F_GETFL) & _O_DIRECT:
            _write_all(fd, view)
            return
        try:
            self._write_direct(fd, view)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            # Alignment this device will not take: through the page cache from the start.
            self.enabled = False
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_O_DIRECT)
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            _write_all(fd, view)

    def _write_direct(self, fd: int, view: memoryview) -> None:
        buf = self._buffer()
        for start in range(0, len(view), self.PIECE):
            piece = view[start : start + self.PIECE]
            size = len(piece)
            padded = -(-size // self.BLOCK) * self.BLOCK
            buf[:size] = piece
            buf[size:padded] = bytes(padded - size)  # nothing of an earlier object on disk
            _write_all(fd, memoryview(buf)[:padded])
        if len(view) % self.BLOCK:
            os.ftruncate(fd, len(view))

    def _buffer(self) -> mmap.mmap:
        buf: mmap.mmap | None = getattr(self._local, "buffer", None)
        if buf is None:  # anonymous mappings are page-aligned
            buf = self._local.buffer = mmap.mmap(-1, self.PIECE)
        return buf


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view) :]
