"""A key/value cache for incremental decoding, preallocated once and passed to the model explicitly.

When generating, each new token attends to the keys and values of every earlier token. Recomputing them for the whole
sequence at every step costs O(T^2); the cache keeps them, so a step only computes the new token's. The storage is
allocated once for the longest sequence (no torch.cat per step), and `length` says how much of it is filled.
"""

from __future__ import annotations

import torch

from .config import GPTConfig


class KVCache:
    """Keys and values of every layer: `k[layer]` and `v[layer]` have shape (B, n_head, max_len, head_size)."""

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        if max_len > config.n_positions:
            raise ValueError(f"max_len={max_len} exceeds the model's context of {config.n_positions} positions")
        shape = (config.n_layer, batch_size, config.n_head, max_len, config.head_size)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.length = 0
        self.max_len = max_len

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys/values (B, nh, T, hs) of `layer` after the filled part; return all of them so far."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache is full: {end} positions needed, {self.max_len} allocated")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, steps: int) -> None:
        """Mark `steps` more positions as filled (the model calls this once per forward, after every layer)."""
        self.length += steps

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows `index` (beam search: each surviving beam continues from its parent's cache).

        Rows whose index is their own position are left untouched; only the filled part is copied.
        """
        if torch.equal(index, torch.arange(len(index), device=index.device)):
            return
        n = self.length
        self.k[:, :, :, :n] = self.k[:, index, :, :n]
        self.v[:, :, :, :n] = self.v[:, index, :, :n]
