"""Reading a prepared dataset and cutting it into training batches with a resumable cursor.

A prepared directory (written by `prepare.py`) holds `train.bin` and `val.bin`, flat arrays of uint16 token ids
where every document is preceded by `<|endoftext|>`, and `meta.json`. The arrays are memory-mapped: opening a
10 GB dataset costs nothing, and the operating system pages in only the windows a batch touches. Of meta.json only
`format` and `counts` (train_tokens, val_tokens) are required, so token files made elsewhere in the same layout
(nanoGPT's train.bin/val.bin are) train here with a two-line meta.json; the rest describes how prepare.py made it.

A training example is a *window* of block_size + 1 consecutive tokens: x is its first block_size tokens and y the
last block_size, so y[t] is the token that follows x[:t+1]. Windows ignore document boundaries; the model learns
from `<|endoftext|>` that the text before it is unrelated.

`BatchLoader` has two ways to choose windows:

- **random**: each batch draws its window starts uniformly from every possible position. Cheap, and over many
  steps every token is seen in many alignments.
- **epoch**: the stream is cut into non-overlapping windows (starting at multiples of block_size); each epoch visits
  every one of them exactly once, in an order shuffled afresh per epoch. A batch that reaches the end of an epoch is
  completed with the first windows of the next one, so no window is skipped.

Exact resume without storing big arrays: batch number `step` in random mode is drawn from a generator seeded with
(seed, step), and the window order of epoch e is the permutation drawn from (seed, e). The cursor is therefore a few
integers - seed, step, epoch, position - and a restored loader regenerates exactly what an uninterrupted one would.

Several processes (data-parallel ranks): the loader defines a *global* batch of world_size * batch_size windows per
step; rank r takes rows r * batch_size to (r + 1) * batch_size - 1 of it. So the ranks' shares are disjoint rows,
and together they hold exactly the batch that one process with batch_size * world_size would get at the same step
and seed. For the same reason the cursor depends only on the global batch: a run saved with 2 ranks x 8 can resume
as 1 rank x 16 (or 4 x 4) and see the same windows.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import ConfigError, DataError

if TYPE_CHECKING:  # torch is imported where batches are made, so that preparing data does not load it
    import torch

FORMAT = "minigpt2-tokens/1"
TOKEN_DTYPE = np.uint16  # GPT-2's 50,257 ids fit in 16 bits: half the disk and page cache of int32
SPLITS = ("train", "val")
PREPARED_FILES = ("meta.json", "train.bin", "val.bin")
MODES = ("random", "epoch")


def is_prepared(directory: str | os.PathLike[str]) -> bool:
    """True if `directory` has the three files of a prepared dataset (meta.json, train.bin, val.bin)."""
    path = Path(directory)
    return path.is_dir() and all((path / name).is_file() for name in PREPARED_FILES)


class PreparedDataset:
    """A directory written by `prepare_dataset`: its `meta` and memory-mapped token arrays.

    Raises DataError if the directory is not a prepared dataset, or if its files disagree with meta.json (which
    would mean an interrupted copy or a hand-edited file).
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        # The command replaces a dataset's files only with --overwrite: the fix must say so when there are any.
        replace = " --overwrite" if any(os.path.lexists(self.directory / n) for n in PREPARED_FILES) else ""
        fix = f"prepare it with `python data/prepare.py INPUT --out {self.directory}{replace}`"
        if not is_prepared(self.directory):
            missing = [n for n in PREPARED_FILES if not (self.directory / n).is_file()]
            what = "does not exist" if not self.directory.exists() else f"has no {', '.join(missing)}"
            raise DataError(f"{self.directory} is not a prepared dataset: it {what}; {fix}")
        try:
            self.meta: dict[str, Any] = json.loads((self.directory / "meta.json").read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{self.directory / 'meta.json'} is not valid JSON ({exc}); {fix}") from None
        if not isinstance(self.meta, dict) or self.meta.get("format") != FORMAT:
            found = self.meta.get("format") if isinstance(self.meta, dict) else None
            raise DataError(f"{self.directory / 'meta.json'} has format {found!r}, expected {FORMAT!r}; {fix}")
        for split in SPLITS:
            try:
                expected = int(self.meta["counts"][f"{split}_tokens"]) * np.dtype(TOKEN_DTYPE).itemsize
            except (KeyError, TypeError, ValueError):
                raise DataError(f"{self.directory / 'meta.json'} has no counts.{split}_tokens (a number); {fix}") \
                    from None
            size = (self.directory / f"{split}.bin").stat().st_size
            if size != expected:
                raise DataError(f"{self.directory / f'{split}.bin'} has {size} bytes but meta.json expects "
                                f"{expected}: the dataset is incomplete or was modified; {fix}")

    def tokens(self, split: str) -> np.ndarray:
        """The token ids of `split` ("train" or "val"), memory-mapped read-only."""
        if split not in SPLITS:
            raise ConfigError(f"split {split!r} is not one of {', '.join(SPLITS)}")
        path = self.directory / f"{split}.bin"
        if path.stat().st_size == 0:  # a split of no tokens (meta.json may say 0): mmap cannot map an empty file
            return np.zeros(0, dtype=TOKEN_DTYPE)
        return np.memmap(path, dtype=TOKEN_DTYPE, mode="r")


class BatchLoader:
    """Batches (x, y) of windows of `tokens`, with a cursor that `state_dict` saves and `load_state_dict` restores.

    See the module docstring for the two modes and for what holds across ranks. `step` counts global batches
    served; `epoch` counts completed passes over all windows in epoch mode (it stays 0 in random mode).
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, block_size: int, *, mode: str = "random",
                 seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if mode not in MODES:
            raise ConfigError(f"mode {mode!r} is not one of {', '.join(MODES)}")
        if batch_size < 1 or block_size < 1:
            raise ConfigError(f"batch_size ({batch_size}) and block_size ({block_size}) must be at least 1")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is not in [0, world_size={world_size})")
        if seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {seed}")
        _check_length(tokens, block_size)
        self.tokens = tokens
        self.batch_size = batch_size
        self.block_size = block_size
        self.mode = mode
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.global_batch = batch_size * world_size
        self.n_windows = (len(tokens) - 1) // block_size  # non-overlapping windows, for epoch mode
        self.step = 0  # global batches served so far
        self.epoch = 0  # completed passes over all windows (epoch mode)
        self.position = 0  # windows of the current epoch already served (epoch mode)
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, its window permutation), cached

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (x, y), int64 tensors of shape (batch_size, block_size), y = x shifted left by one token."""
        starts = self._random_starts() if self.mode == "random" else self._epoch_starts()
        self.step += 1
        mine = starts[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        return _windows(self.tokens, mine, self.block_size)

    def _random_starts(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.step])
        return rng.integers(0, len(self.tokens) - self.block_size, size=self.global_batch)

    def _epoch_starts(self) -> np.ndarray:
        taken: list[np.ndarray] = []
        needed = self.global_batch
        while needed:
            order = self._permutation(self.epoch)
            chunk = order[self.position:self.position + needed]
            taken.append(chunk)
            needed -= len(chunk)
            self.position += len(chunk)
            if self.position == self.n_windows:
                self.epoch, self.position = self.epoch + 1, 0
        return np.concatenate(taken) * self.block_size

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n_windows))
        return self._order[1]

    def state_dict(self) -> dict[str, Any]:
        """The cursor: a few integers (JSON-serialisable), plus what must match for a restore to be exact."""
        return {"mode": self.mode, "seed": self.seed, "step": self.step, "epoch": self.epoch,
                "position": self.position, "global_batch": self.global_batch, "block_size": self.block_size,
                "n_tokens": len(self.tokens)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`: the next batches are exactly those the saved loader would have produced next.

        The loader must read the same tokens with the same mode, block_size and global batch (batch_size *
        world_size); the seed is taken from `state`.
        """
        current = self.state_dict()
        for key in ("mode", "block_size", "global_batch", "n_tokens"):
            if state.get(key) != current[key]:
                raise ConfigError(f"cannot resume the data loader: saved {key}={state.get(key)!r} but this run has "
                                  f"{current[key]!r}; resume with the same data, mode, block_size and "
                                  "batch_size * world_size")
        self.seed, self.step, self.epoch, self.position = (int(state[k]) for k in ("seed", "step", "epoch", "position"))
        self._order = None  # a permutation cached from this loader's own seed would outlive the restored one


def iter_eval_batches(tokens: np.ndarray, batch_size: int, block_size: int,
                      max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic (x, y) batches of non-overlapping windows of `tokens`, for evaluation.

    Without `max_batches`, every window starting at a multiple of block_size is used once, in order (the last batch
    may be smaller). With it, at most max_batches * batch_size windows are used, evenly spaced over the whole split
    so that a capped evaluation still sees all of it rather than just its beginning.
    """
    if batch_size < 1 or block_size < 1:
        raise ConfigError(f"batch_size ({batch_size}) and block_size ({block_size}) must be at least 1")
    if max_batches is not None and max_batches < 0:
        raise ConfigError(f"max_batches must be None or >= 0, got {max_batches}")
    _check_length(tokens, block_size)
    n_windows = (len(tokens) - 1) // block_size
    wanted = n_windows if max_batches is None else min(n_windows, max_batches * batch_size)
    chosen = (np.arange(wanted) * n_windows) // max(wanted, 1)  # == arange(n_windows) when nothing is capped
    for first in range(0, wanted, batch_size):
        yield _windows(tokens, chosen[first:first + batch_size] * block_size, block_size)


def _windows(tokens: np.ndarray, starts: np.ndarray, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    rows = torch.from_numpy(np.stack([tokens[s:s + block_size + 1] for s in starts]).astype(np.int64))
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


def _check_length(tokens: np.ndarray, block_size: int) -> None:
    if len(tokens) < block_size + 1:
        raise DataError(f"the split has {len(tokens)} tokens, fewer than block_size + 1 = {block_size + 1}; use a "
                        "smaller block_size or more text")
