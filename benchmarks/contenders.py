"""What the benchmark scripts share: checking the --device asked for, warming contenders up, and leaving out one
that fails there."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch


def check_device(parser: argparse.ArgumentParser, device: str) -> bool:
    """Whether --device `device` is a CUDA GPU (cuda or cuda:N); a usage error if it is one this machine lacks."""
    on_gpu = torch.device(device).type == "cuda"
    if on_gpu and not torch.cuda.is_available():
        parser.error(f"--device {device}: torch.cuda.is_available() is False here; leave --device out to run on "
                     "the CPU")
    return on_gpu


def warmed_up(contenders: dict[str, Callable[[], object]], warmup: int, indent: str,
              report: bool = True) -> dict[str, Callable[[], object]]:
    """The contenders after `warmup` calls each (compiles, autotuning and first allocations happen there), without
    those whose warm-up raised.

    A failing contender is reported and left out, so that one broken path (a kernel or a compile that fails on this
    machine, say) does not cost the others' figures. `report`: also print how long each warm-up took.
    """
    ready = {}
    for name, run in contenders.items():
        start = time.perf_counter()
        try:
            for _ in range(warmup):
                run()
        except Exception as error:  # noqa: BLE001 - any failure: report it, time the rest
            print(f"{indent}{name} failed in its warm-up and is left out: {type(error).__name__}: {error}", flush=True)
            continue
        if report:
            print(f"{indent}warm-up of {name}: {time.perf_counter() - start:.1f} s ({warmup} runs, compiling if asked)",
                  flush=True)
        ready[name] = run
    return ready
