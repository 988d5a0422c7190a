"""Learning-rate schedules: a short linear warmup, then a decay (cosine, linear) or a constant rate.

    lr
    ^     ____
    |    /    `--.__                      cosine: lr(s) = min_lr + (peak - min_lr) * (1 + cos(pi * progress)) / 2
    |   /           `--.__                linear: lr(s) = min_lr + (peak - min_lr) * (1 - progress)
    |  /                  `--.__          progress = (s - warmup) / (max_steps - warmup), from 0 to 1
    | /                          `---     constant: lr(s) = peak
    +--------------------------------> step s
      warmup            max_steps

Why warm up: at the first steps Adam's second-moment estimate rests on a handful of gradients, so its updates are
large and noisy; ramping the rate from near zero over a few dozen steps keeps them from wrecking pretrained weights.
Why decay: a smaller rate near the end lets the weights settle into the minimum instead of bouncing around it.

A schedule is a pure function of the step number, so resuming a run needs nothing but the step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import ConfigError

SCHEDULES = ("cosine", "linear", "constant")


@dataclass(frozen=True)
class LRSchedule:
    """The learning rate of update `step` (0-based): `schedule(step)`.

    Warmup is linear from peak / warmup_steps at step 0 to peak at step warmup_steps - 1, so the very first update
    already moves the weights. After max_steps the rate stays at its final value (min_lr, or peak if constant).
    """

    peak: float
    max_steps: int
    warmup_steps: int = 0
    kind: str = "cosine"
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ConfigError(f"lr schedule {self.kind!r} is not one of {', '.join(SCHEDULES)}")
        if self.peak < 0 or self.min_lr < 0 or self.min_lr > self.peak:
            raise ConfigError(f"need 0 <= min_lr <= lr, got min_lr={self.min_lr}, lr={self.peak}")
        if self.max_steps < 1 or self.warmup_steps < 0:
            raise ConfigError(f"need max_steps >= 1 and warmup_steps >= 0, got {self.max_steps}, {self.warmup_steps}")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.peak * (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return self.peak
        decay_steps = self.max_steps - self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / decay_steps) if decay_steps > 0 else 1.0
        if self.kind == "cosine":
            return self.min_lr + (self.peak - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr + (self.peak - self.min_lr) * (1.0 - progress)
