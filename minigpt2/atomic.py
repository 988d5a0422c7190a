"""Writing a file so that an interrupted write never leaves it half-written under its name.

The new content goes to a temporary file beside the target, which is then renamed over it: on POSIX and Windows a
rename within one directory replaces the target in a single step, so readers see the old file or the new one,
never a mix. Every file minigpt2 writes goes through here (checkpoint directories are staged the same way, whole),
but metrics.jsonl, which grows a line at a time (cutting it back on resume goes through here).
A command that fails leaves no folder behind either: see `removed_if_failed`. A process killed outright (SIGKILL, a
crash) cannot clean up: the staging folders it leaves are deleted by the next save of the same name (`staging_path`).
And two processes never write one folder's files at once: see `FolderLock`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import socket
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: folders are not locked there
    fcntl = None

_HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname()) or "host"


def write_atomically(path: str | os.PathLike[str], write: Callable[[Path], object]) -> None:
    """Have `write(staging)` write a file beside `path`, then rename it over `path`; the temporary file is removed
    if `write` fails."""
    write_all_atomically({path: write})


def write_all_atomically(writers: Mapping[str | os.PathLike[str], Callable[[Path], object]]) -> None:
    """Files that belong together (a report in two formats), each written by its `write(staging)` beside it and all
    written before any is renamed over its path: a failure while writing (a full disk) leaves every old file as it
    was. The temporary files are removed whatever happens."""
    staged = [(Path(path), Path(path).with_name(f".tmp-{Path(path).name}"), write) for path, write in writers.items()]
    try:
        for _, staging, write in staged:
            write(staging)
        for target, staging, _ in staged:
            os.replace(staging, target)
    finally:
        for _, staging, _ in staged:
            staging.unlink(missing_ok=True)


def write_text_atomically(path: str | os.PathLike[str], text: str) -> None:
    """`path` replaced by `text` (UTF-8), atomically."""
    write_texts_atomically({path: text})


def write_texts_atomically(texts: Mapping[str | os.PathLike[str], str]) -> None:
    """`write_all_atomically` for texts (UTF-8)."""
    write_all_atomically({path: functools.partial(Path.write_text, data=text, encoding="utf-8")
                          for path, text in texts.items()})


@contextlib.contextmanager
def removed_if_failed(folder: str | os.PathLike[str]) -> Iterator[None]:
    """For a block that may create `folder` and its missing parents: if the block fails (or is interrupted), those
    it created are removed again. Only empty folders go (rmdir), so nothing anyone wrote meanwhile is lost."""
    path = Path(folder).absolute()
    try:
        missing = [f for f in (path, *path.parents) if not f.exists()]  # deepest first
    except OSError:  # a name too long, a folder we may not look into: the block's own mkdir reports it
        missing = []
    try:
        yield
    except BaseException:
        for f in missing:
            with contextlib.suppress(OSError):
                f.rmdir()
        raise


def staging_path(parent: str | os.PathLike[str], name: str) -> Path:
    """A new path `parent/.tmp-<name>-<host>-<pid>-<random>` to stage `name` in (the caller creates it).

    The name says which process of which machine staged it, so that the staging folders of `name` that a process
    of this machine left when it was killed, and that no longer runs, can be told from those of a save in progress:
    they are deleted here first. On Windows, where no process can be probed safely, nothing is deleted.
    """
    folder = Path(parent)
    left_by = re.compile(rf"^\.tmp-{re.escape(name)}-{_HOST}-(\d+)-[0-9a-f]{{8}}$")
    with contextlib.suppress(OSError):  # `parent` missing or unreadable: nothing to clean
        for path in folder.iterdir():
            match = left_by.match(path.name)
            if match and path.is_dir() and not _running(int(match.group(1))):
                shutil.rmtree(path, ignore_errors=True)
    return folder / f".tmp-{name}-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _running(pid: int) -> bool:
    """Whether a process `pid` runs on this machine (True when that cannot be known)."""
    if os.name == "nt":  # os.kill(pid, 0) would send it Ctrl-C there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


class FolderLock:
    """One writer per folder: an exclusive lock on the file `.lock` inside it, which holds the owner's process id.

    The lock is the operating system's (flock), not the file's existence, so it ends with its process however that
    ends: a run killed with SIGKILL leaves at most a stale `.lock` file, which the next run simply takes over.
    `release` deletes the file while still holding the lock. A process that opened the old file just before then
    could lock that deleted file, so `acquire` checks that the file it locked is still the one at the path.
    """

    NAME = ".lock"

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.path = Path(folder) / self.NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> int | None:
        """Take the lock (the folder must exist); None on success, else the process id of the holder (0 if its
        file does not say)."""
        if fcntl is None or self.held:
            return None
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode("ascii", "replace").strip()
                os.close(fd)
                return int(holder) if holder.isdigit() else 0
            try:
                same_file = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same_file = False
            if same_file:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                self._fd = fd
                return None
            os.close(fd)  # released and deleted by its holder meanwhile: lock the file now at the path

    def release(self) -> None:
        """Give the lock up and delete its file (a no-op when not held)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self._fd)
        self._fd = None
