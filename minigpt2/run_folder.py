"""A training run's output folder (--out): who may write it, what an earlier run left there, and the run's files
besides its checkpoints.

--out holds one run: its checkpoint-* folders (checkpoint.py), the final model exported from the best checkpoint
(config.json, model.safetensors, generation_config.json), train_config.json, metrics.jsonl (a JSON line per log
interval and per evaluation), loss.png, and train.py's report. Three rules keep that whole:

- One writer: a run holds the folder's lock (atomic.FolderLock) while it writes, and a second run started there is
  refused, naming the process that holds it.
- Nothing replaced unasked: a folder holding another run's files is refused unless the run continues it (--resume)
  or replaces it (--overwrite). A replaced run is set aside, and deleted only once the new run has a checkpoint, so
  a new run that fails early leaves the old one recoverable.
- A resumed run writes what a straight one would: metrics.jsonl is cut back to the step resumed from, since a
  crashed run may have logged past its last checkpoint.

Only the main process of a data-parallel run calls these.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from . import checkpoint as ckpt
from .atomic import FolderLock, write_atomically
from .errors import ConfigError

RUN_FILES = ("train_config.json", "metrics.jsonl", "loss.png", "config.json", "model.safetensors",
             "generation_config.json", "report.html", "report.md")


def check_output_dir(out: Path) -> None:
    """ConfigError unless `out` is, or can be made as, a directory we may write in (checked before any work)."""
    try:
        existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    except OSError as exc:  # a name too long for the file system, a folder we may not look into
        raise ConfigError(f"--out {out}: {exc.strerror}; choose another --out") from None
    if not existing.is_dir():
        raise ConfigError(f"--out {out}: {existing} is a file, not a directory; choose another --out")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out}: {existing} is not writable; choose another --out")


def previous_run(out: Path) -> list[Path]:
    """The files and checkpoints in `out` that belong to an earlier training run."""
    if not out.is_dir():
        return []
    return sorted(p for p in out.iterdir() if p.name in RUN_FILES or p.name.startswith(ckpt.PREFIX))


class RunFolder:
    """The output folder of one run.

    overwrite: this run may replace another run's files there. continues: this run continues the run already there
    (it resumes one of the folder's own checkpoints); set once the checkpoint to resume from is known.
    """

    def __init__(self, path: Path, *, overwrite: bool) -> None:
        self.path = path
        self.overwrite = overwrite
        self.continues = False
        self.lock = FolderLock(path)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Create the folder and hold its lock for the block (a no-op when already held)."""
        if self.lock.held:
            yield
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"--out {self.path}: cannot create the directory ({exc.strerror}); choose another "
                              "--out") from None
        self.take_lock()
        try:
            yield
        finally:
            self.lock.release()

    def check_not_busy(self) -> None:
        """ConfigError if another run holds the folder now (checked at set-up, before loading anything)."""
        if self.path.is_dir():
            self.take_lock()
            self.lock.release()

    def take_lock(self) -> None:
        """Take the folder's lock, or say which run holds it: two runs writing one directory would mix their files."""
        try:
            holder = self.lock.acquire()
        except OSError as exc:  # e.g. another user's run, killed, left its lock file
            raise ConfigError(f"--out {self.path}: cannot lock it through {self.lock.path} ({exc.strerror}); "
                              "remove that file if no run is writing there, or choose another --out") from None
        if holder is not None:
            which = f" (process {holder})" if holder else ""
            raise ConfigError(f"--out {self.path} is in use by another training run{which}; wait for it to end, "
                              "or choose another --out")

    def check_nothing_set_aside(self) -> None:
        """ConfigError if the folder holds a run that set_aside moved away and no one will put back or delete: the
        replacing run was killed outright before its first checkpoint. Called with no run in the folder (after
        check_not_busy), so no set-aside folder there belongs to a live run; only the user can tell which run to
        keep."""
        left = sorted(self.path.glob(".replaced-run-*")) if self.path.is_dir() else []
        if left:
            raise ConfigError(f"--out {self.path}: {left[0].name} holds a run set aside by an --overwrite run that "
                              f"was killed before its first checkpoint; move its contents back into {self.path} to "
                              "keep that run, or delete it, then run again")

    def holds_another_run(self) -> bool:
        """Whether the folder holds another run's files that this run would mix with or replace unasked."""
        return not self.overwrite and not self.continues and bool(previous_run(self.path))

    def previous_run_replaced(self) -> list[Path]:
        """What of an earlier run this one replaces: all of it with --overwrite, unless continuing it."""
        return previous_run(self.path) if self.overwrite and not self.continues else []

    def set_aside(self, paths: list[Path], log: Callable[[str], None]) -> Path | None:
        """Move `paths` (files and checkpoints of the folder) into a hidden folder and return it; None if none.

        The caller deletes that folder once the new run has its first checkpoint, or puts it back (put_back) if the
        run fails before then.
        """
        if not paths:
            return None
        set_aside = self.path / f".replaced-run-{os.getpid()}"
        set_aside.mkdir()
        for path in paths:
            os.replace(path, set_aside / path.name)
        log(f"--overwrite: {', '.join(p.name for p in paths[:3])}{' ...' if len(paths) > 3 else ''} moved to "
            f"{set_aside.name}, to be deleted after the first checkpoint")
        return set_aside

    def put_back(self, set_aside: Path) -> None:
        """Undo set_aside: what the new run wrote under the same names goes, the old files come back."""
        for path in set_aside.iterdir():
            target = self.path / path.name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
            os.replace(path, target)
        set_aside.rmdir()

    def write_config(self, settings: dict[str, Any]) -> None:
        """train_config.json: the resolved settings of the run."""
        text = json.dumps(settings, indent=2) + "\n"
        write_atomically(self.path / "train_config.json", lambda staging: staging.write_text(text))

    def trim_metrics(self, step: int) -> None:
        """Keep only the metrics of steps up to `step`, the one resumed from (none for a new run)."""
        path = self.path / "metrics.jsonl"
        kept = []
        if step > 0 and path.exists():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        write_atomically(path, lambda staging: staging.write_text("".join(line + "\n" for line in kept)))

    def append_metrics(self, record: dict[str, Any]) -> None:
        """One line of metrics.jsonl; a non-finite number (a loss of only skipped steps) is written as null, since
        JSON has no NaN and strict readers (jq, JSON.parse) refuse Python's."""
        finite = {key: None if isinstance(value, float) and not math.isfinite(value) else value
                  for key, value in record.items()}
        with (self.path / "metrics.jsonl").open("a") as handle:
            handle.write(json.dumps(finite, allow_nan=False) + "\n")

    def plot_loss(self, log: Callable[[str], None] = print) -> bool:
        """loss.png: training and validation loss from metrics.jsonl; False (with a note) without matplotlib."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            log("note: matplotlib is not installed, so no loss.png (pip install 'minigpt2[plot]')")
            return False
        records = [json.loads(line) for line in (self.path / "metrics.jsonl").read_text().splitlines() if line]
        train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
        val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
        fig, ax = plt.subplots(figsize=(7, 4))
        for points, label, style in ((train, "train", "-"), (val, "validation", "o-")):
            if points:
                ax.plot(*zip(*points), style, label=label)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        write_atomically(self.path / "loss.png", lambda staging: fig.savefig(staging, dpi=100, format="png"))
        plt.close(fig)
        return True
