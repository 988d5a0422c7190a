"""Writing a file so that an interrupted write never leaves it half-written under its name.

The new content goes to a temporary file beside the target, which is then renamed over it: on POSIX and Windows a
rename within one directory replaces the target in a single step, so readers see the old file or the new one,
never a mix. Every file minigpt2 writes goes through here (checkpoint directories are staged the same way, whole).
A command that fails leaves no folder behind either: see `removed_if_failed`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path


def write_atomically(path: str | os.PathLike[str], write: Callable[[Path], object]) -> None:
    """Have `write(staging)` write a file beside `path`, then rename it over `path`; the temporary file is removed
    if `write` fails."""
    target = Path(path)
    staging = target.with_name(f".tmp-{target.name}")
    try:
        write(staging)
        os.replace(staging, target)
    finally:
        staging.unlink(missing_ok=True)


def write_text_atomically(path: str | os.PathLike[str], text: str) -> None:
    """`path` replaced by `text` (UTF-8), atomically."""
    write_atomically(path, lambda staging: staging.write_text(text, encoding="utf-8"))


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
