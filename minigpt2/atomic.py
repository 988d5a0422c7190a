"""Writing a file so that an interrupted write never leaves it half-written under its name.

The new content goes to a temporary file beside the target, which is then renamed over it: on POSIX and Windows a
rename within one directory replaces the target in a single step, so readers see the old file or the new one,
never a mix. Every file minigpt2 writes goes through here (checkpoint directories are staged the same way, whole).
"""

from __future__ import annotations

import os
from collections.abc import Callable
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
