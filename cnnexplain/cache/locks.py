"""Inter-process locks on cache entries: ``fcntl.flock`` on ``<key>.h5.lock``, re-entrant within a
process (a table of held locks), dropped in a forked child."""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

WAIT_NOTICE_S = 2.0
"""After waiting this long for another process's lock, say so (once)."""


# --------------------------------------------------------------------------------------------
# Inter-process locks, re-entrant within a process
# --------------------------------------------------------------------------------------------

@dataclass
class _Held:
    """One lock file as seen by this process: a thread lock, the flock'ed fd and the depth."""

    rlock: threading.RLock = field(default_factory=threading.RLock)
    fd: int | None = None
    depth: int = 0


_HELD: dict[str, _Held] = {}
_HELD_GUARD = threading.Lock()


def _held(lock_path: Path) -> _Held:
    with _HELD_GUARD:
        return _HELD.setdefault(os.path.realpath(lock_path), _Held())


def _forget_locks_after_fork() -> None:
    """A forked child (a DataLoader worker) holds none of its parent's locks: drop the table and
    close the inherited lock fds (never unlock them: that would unlock the parent), so a child
    that outlives a killed parent does not keep the lock."""
    global _HELD_GUARD
    for held in _HELD.values():
        if held.fd is not None:
            with contextlib.suppress(OSError):
                os.close(held.fd)
    _HELD.clear()
    _HELD_GUARD = threading.Lock()


os.register_at_fork(after_in_child=_forget_locks_after_fork)


def _acquire(lock_path: Path, timeout: float | None, on_wait: Callable[[], None] | None = None
             ) -> bool:
    """Take the lock (``timeout`` None: wait forever; 0: try once). False when it timed out.

    flock locks belong to an open file description, so a second ``open`` + ``flock`` of the same
    file in this process would deadlock; the table of held locks makes it re-entrant instead
    (and serializes the threads of this process). OSError (unwritable directory) propagates.
    """
    held = _held(lock_path)
    deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
    if timeout is not None and timeout <= 0:
        got = held.rlock.acquire(blocking=False)
    else:
        got = held.rlock.acquire(timeout=-1 if timeout is None else timeout)
    if not got:
        return False
    try:
        if held.depth == 0:
            fd = _flock(lock_path, deadline, on_wait)
            if fd is None:
                held.rlock.release()
                return False
            held.fd = fd
        held.depth += 1
        return True
    except BaseException:
        held.rlock.release()
        raise


def _release(lock_path: Path) -> None:
    held = _held(lock_path)
    held.depth -= 1
    try:
        if held.depth == 0:
            fd, held.fd = held.fd, None
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)
    finally:
        held.rlock.release()


def _flock(lock_path: Path, deadline: float | None, on_wait) -> int | None:
    """flock ``lock_path`` exclusively; the fd, or None at the deadline.

    After getting the lock, check that the path still names the locked file: ``clear()`` may
    have removed it while we waited, and a lock on a removed file protects nothing.
    """
    start = time.monotonic()
    delay = 0.01
    announced = False
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    now = time.monotonic()
                    if deadline is not None and now >= deadline:
                        os.close(fd)
                        return None
                    if on_wait is not None and not announced and now - start >= WAIT_NOTICE_S:
                        announced = True
                        on_wait()
                    pause = delay if deadline is None else min(delay, max(deadline - now, 0.001))
                    time.sleep(pause)
                    delay = min(delay * 1.5, 0.5)
            mine = os.fstat(fd)
            try:
                now_there = os.stat(lock_path)
                same = (now_there.st_dev, now_there.st_ino) == (mine.st_dev, mine.st_ino)
            except FileNotFoundError:
                same = False
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise
        if same:
            return fd
        os.close(fd)
