"""Directory syncs shared between the threads of a process (local storage's renames).

A file is durable once fsynced; its name only once the directory holding it has been synced
after the rename. Thousands of images land in one directory from a pool of threads, so
:class:`DirectorySync` lets the threads that renamed into one directory at about the same time
share one sync (a group commit) instead of each syncing it in turn.
"""

from __future__ import annotations

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
