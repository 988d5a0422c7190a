"""A key/value cache for incremental decoding, preallocated once and passed to the model explicitly.

When generating, each new token attends to the keys and values of every earlier token. Recomputing them for the whole
sequence at every step costs O(T) a step, O(T^2) over T new tokens; the cache keeps them, so a step only computes the
new token's. The storage is allocated once for the longest sequence (no torch.cat per step), and `length` says how
much of it is filled.
"""

from __future__ import annotations

import torch

from .config import GPTConfig


class KVCache:
    """Keys and values of every layer: `k[layer]` and `v[layer]` have shape (B, n_head, max_len, head_size).

    Both live in one tensor, `kv` (n_layer, 2, B, n_head, max_len, head_size), of which `k` and `v` are views: a
    decoding step then stores a layer's new key and value with one copy (see decode_step.py).

    Writes go through `kv` itself, so the cache also works with autograd on: keys and values that require grad make
    `kv` part of the graph. The views are therefore taken afresh at each use (autograd refuses in-place writes into
    views that one call returned several of, like `unbind`'s).
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        if max_len > config.n_positions:
            raise ValueError(f"max_len={max_len} exceeds the model's context of {config.n_positions} positions")
        shape = (config.n_layer, 2, batch_size, config.n_head, max_len, config.head_size)
        self.kv = torch.empty(shape, device=device, dtype=dtype)
        self.length = 0
        self.max_len = max_len
        self.config = config

    @property
    def k(self) -> torch.Tensor:
        """Keys of every layer, (n_layer, B, n_head, max_len, head_size): a view of `kv`."""
        return self.kv[:, 0]

    @property
    def v(self) -> torch.Tensor:
        """Values of every layer, (n_layer, B, n_head, max_len, head_size): a view of `kv`."""
        return self.kv[:, 1]

    @property
    def batch_size(self) -> int:
        return self.kv.shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys/values (B, nh, T, hs) of `layer` after the filled part; return all of them so far."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache is full: {end} positions needed, {self.max_len} allocated")
        self.kv[layer, 0, :, :, start:end] = k
        self.kv[layer, 1, :, :, start:end] = v
        keys, values = self.kv[layer, 0, :, :, :end], self.kv[layer, 1, :, :, :end]
        if self.kv.requires_grad:
            # Attention saves its keys and values for the backward pass, and the next step writes into this storage:
            # hand it copies, as a cache that grows by torch.cat would.
            return keys.clone(), values.clone()
        return keys, values

    def advance(self, steps: int) -> None:
        """Mark `steps` more positions as filled (the model calls this once per forward, after the last layer: every
        layer's `update` writes at the same positions)."""
        self.length += steps

    def clear(self) -> None:
        """Forget every position (the storage is kept): the next forward starts a new sequence."""
        self.length = 0

    def repeat_rows(self, repeats: int) -> KVCache:
        """A cache with each row repeated `repeats` times in a row (row b -> rows b*repeats ... b*repeats+repeats-1).

        Beam search and num_return_sequences continue one prompt in several rows: each distinct prompt is
        prefilled once, then its keys/values are copied into every row that continues it.
        """
        grown = KVCache(self.config, self.batch_size * repeats, self.max_len, self.k.device, self.k.dtype)
        grown.length = n = self.length
        grown.k[:, :, :, :n] = self.k[:, :, :, :n].repeat_interleave(repeats, dim=1)
        grown.v[:, :, :, :n] = self.v[:, :, :, :n].repeat_interleave(repeats, dim=1)
        return grown

    def reorder(self, index: torch.Tensor, start: int = 0) -> None:
        """Row i continues from row index[i] (beam search: each surviving beam takes its parent's keys/values).

        Only rows whose parent is another row are written, and only their filled positions from `start` on: beams
        of one prompt share the prompt's keys/values, so beam search passes start=prompt length and copies just the
        generated part. A beam that extends itself, the common case, costs nothing.
        """
        moved = (index != torch.arange(len(index), device=index.device)).nonzero().squeeze(1).tolist()  # (n, 1) -> n
        if not moved:
            return
        parents = index[moved].tolist()
        n = self.length
        for cache in (self.k, self.v):
            # Read before writing: a parent that is itself overwritten (a swap, 0 <- 1 and 1 <- 0) is copied first.
            # One slice copy per row moves whole contiguous runs; advanced indexing of the rows was 3-4x slower.
            sources = [cache[:, p, :, start:n].clone() if p in moved else cache[:, p, :, start:n] for p in parents]
            for row, source in zip(moved, sources):
                cache[:, row, :, start:n] = source
