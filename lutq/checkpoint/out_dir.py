"""Claiming an output directory OUT and moving a finished one into place, safely against crashes and rivals.

Beside OUT, in its parent directory:

    .OUT.lock                   held (flock, exclusive) by the one process writing OUT; holds its pid
    .OUT.partial-<pid>-<rand>/  the directory being built; renamed to OUT when complete
    .OUT.old-<pid>-<rand>/OUT   with --force, the previous OUT during the swap, deleted right after

Why each piece:
- OUT only ever appears by one rename of a complete directory, so a crash, Ctrl-C or kill -9 at any moment leaves
  no OUT or the whole one, never a partial one.
- The lock makes two concurrent writers of one OUT exclusive: the second is refused at once instead of both
  working for minutes and one rename clobbering the other. The kernel releases a flock when its holder dies, so a
  killed writer never leaves a lock that blocks the next run.
- The owner's pid is in the temporary directory's name (given at creation: there is no moment without it), so the
  next writer of OUT deletes the leftovers of writers that are dead, and only those.
- A kill -9 between the two renames of a --force swap leaves no OUT but the complete old one under .OUT.old-*: the
  next writer puts it back (it was the last complete OUT) before deciding anything.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

from lutq.errors import LutqError

try:
    import fcntl
except ImportError:  # not POSIX: no lock, the rest still holds
    fcntl = None


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie (a killed child not yet reaped counts as dead)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def owner_pid(entry: str, prefix: str) -> int | None:
    """The pid in `<prefix><pid>-<rand>`, or None when the name does not have that form."""
    pid, sep, _ = entry[len(prefix):].partition("-")
    return int(pid) if sep and pid.isdigit() else None


@contextmanager
def signals_deferred():
    """Hold Ctrl-C and SIGTERM for the duration of a few renames that must happen together; deliver them after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    wanted = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in wanted}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        if pending:
            signal.raise_signal(pending[0])


class OutputClaim:
    """The right to write OUT: the lock beside it and a fresh temporary directory `tmp` to build it in.

    `commit()` moves tmp into place (replacing OUT when `force`); `release()` gives up, deleting tmp. Either way the
    lock is released. Refuses (LutqError) an existing OUT without force, and an OUT another process is writing.
    """

    def __init__(self, out: Path, force: bool = False):
        self.out = Path(out)
        self.force = force
        self.parent = self.out.parent
        if not self.parent.is_dir():
            raise LutqError(f"{self.parent}: no such directory")
        name = self.out.name
        self.lock_path = self.parent / f".{name}.lock"
        self.partial_prefix, self.old_prefix = f".{name}.partial-", f".{name}.old-"
        self._lock_fd: int | None = None
        self.tmp: Path | None = None
        try:
            self._lock()
            self._clean_up_after_the_dead()
            if os.path.lexists(self.out) and not force:
                raise LutqError(f"{self.out}: already exists (pass --force to replace it)")
            self.tmp = Path(tempfile.mkdtemp(prefix=f"{self.partial_prefix}{os.getpid()}-", dir=self.parent))
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self.tmp, 0o777 & ~umask)  # mkdtemp's 0700 would outlive the rename
        except OSError as e:
            self.release()
            raise LutqError(f"{self.parent}: cannot write ({e.strerror})") from None
        except BaseException:
            self.release()
            raise

    def _lock(self) -> None:
        if fcntl is None:
            return
        while True:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode("ascii", "replace").strip() or "?"
                os.close(fd)
                raise LutqError(f"{self.out}: another lutq process (pid {holder}) is writing it; wait for it to "
                                f"finish or choose another OUT") from None
            # The previous holder deletes the lock file as it lets go: if that happened between our open and our
            # flock, we hold a lock on a deleted file, which excludes nobody. Then lock the file now at the path.
            try:
                current = os.stat(self.lock_path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            try:
                os.unlink(self.lock_path)  # while still holding it: see _lock
            except OSError:
                pass
            os.close(self._lock_fd)
            self._lock_fd = None

    def _clean_up_after_the_dead(self) -> None:
        """Delete the temporary directories of dead writers of OUT; put back an OUT a dead --force swap took away."""
        for entry in sorted(os.listdir(self.parent)):
            for prefix in (self.old_prefix, self.partial_prefix):
                if not entry.startswith(prefix):
                    continue
                pid = owner_pid(entry, prefix)
                if pid is None or pid_alive(pid):
                    continue  # not ours to judge (an older lutq's, or a live process's)
                path = self.parent / entry
                saved = path / self.out.name
                if prefix == self.old_prefix and saved.exists() and not os.path.lexists(self.out):
                    os.rename(saved, self.out)
                shutil.rmtree(path, ignore_errors=True)

    def commit(self) -> None:
        """Move the finished temporary directory into place as OUT, then release the lock."""
        old = None
        try:
            with signals_deferred():
                if os.path.lexists(self.out):
                    if not self.force:
                        raise LutqError(f"{self.out}: appeared while it was being written; not replaced "
                                        f"(pass --force to replace it)")
                    old = Path(tempfile.mkdtemp(prefix=f"{self.old_prefix}{os.getpid()}-", dir=self.parent))
                    os.rename(self.out, old / self.out.name)
                os.rename(self.tmp, self.out)
                self.tmp = None
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            self.release()

    def release(self) -> None:
        """Give up: delete the temporary directory (if not committed) and release the lock. Safe to call twice."""
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None
        self._unlock()
