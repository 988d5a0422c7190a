"""Where a CPU decoding step's time goes: matrix products, the rest of the model, and Python.

    python benchmarks/decode_breakdown.py [--preset gpt2] [--repeats 5] [--threads N]

Prints, for minigpt2's cached decoding step (fp32, weights held as generate() holds them):

    floor      one pass of products over every weight matrix, for 1, 4 and 8 rows (what a greedy, 4-beam and
               8-sample step must at least do), in the fastest weight layout (see benchmarks/generate.py's floor)
    step       the model's forward for one new token (batch 1, 64 tokens in the cache); and for 4 rows with weights
               packed as generate() packs them
    fast step  the same two with decode_step.py's module-free step, the one generate() runs
    alternated the fast step and a pass of products over the model's own weights, taken in turn 40 times (so that
               both see the same load and the same caches): best and median of each
    no matmul  the same step with every nn.Linear returning a ready-made result: the rest of the model
    width 96   the same step on a model of the same depth and heads but width 96: Python and dispatch alone

Background for docs/benchmarks.md (Generation); the comparison with transformers is `benchmarks/generate.py`.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from generate import weight_streaming_floor  # benchmarks/generate.py, beside this script

from minigpt2 import GPT, GPTConfig
from minigpt2.decode_step import DecodeStep
from minigpt2.kv_cache import KVCache
from minigpt2.prepack import prepacked, use_decoding_layout


def best_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def step_ms(model: GPT, repeats: int, past: int = 64, rows: int = 1, fast: bool = False) -> float:
    """One cached step for a single new token in each of `rows` rows, with `past` tokens already in the cache:
    the model's forward, or with `fast` DecodeStep."""
    cache = KVCache(model.config, rows, past + 1)
    model(torch.randint(0, model.config.vocab_size, (rows, past)), kv_cache=cache)
    token = torch.full((rows, 1), 5)
    forward = DecodeStep(model, cache) if fast else None

    def step() -> None:
        if forward is not None:
            forward(token[:, 0])
        else:
            model(token, kv_cache=cache)
        cache.length -= 1  # the next step overwrites the same position

    return best_ms(step, repeats * 10)


def alternated(model: GPT, pairs: int = 40, past: int = 64) -> tuple[list[float], list[float]]:
    """Seconds of the fast step and of a floor pass over the very weights it reads, timed in turn `pairs` times."""
    cache = KVCache(model.config, 1, past + 1)
    model(torch.randint(0, model.config.vocab_size, (1, past)), kv_cache=cache)
    step, token = DecodeStep(model, cache), torch.tensor([5])
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = [torch.ones(1, m.in_features) for m in linears]
    steps, floors = [], []
    for i in range(pairs + 3):  # 3 warm-up pairs
        start = time.perf_counter()
        step(token)
        cache.length -= 1
        middle = time.perf_counter()
        for x, m in zip(inputs, linears):
            torch.nn.functional.linear(x, m.weight, m.bias)
        if i >= 3:
            steps.append(middle - start)
            floors.append(time.perf_counter() - middle)
    return steps, floors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = GPTConfig.from_preset(args.preset)
    model = GPT(config).eval()
    narrow = GPT(GPTConfig(n_layer=config.n_layer, n_head=config.n_head, n_embd=8 * config.n_head,
                           vocab_size=128)).eval()
    for m in (model, narrow):
        use_decoding_layout(m)  # as generate() holds the weights for one row
    print(f"{args.preset}, cpu fp32, {torch.get_num_threads()} threads, best of {args.repeats}")
    with torch.inference_mode():
        for rows in (1, 4, 8):
            print(f"floor, {rows} row(s): {weight_streaming_floor(model, rows, args.repeats) * 1e3:7.2f} ms")
        print(f"step:              {step_ms(model, args.repeats):7.2f} ms")
        print(f"fast step:         {step_ms(model, args.repeats, fast=True):7.2f} ms")
        steps, floors = alternated(model)
        step_median, floor_median = statistics.median(steps), statistics.median(floors)
        print(f"alternated:        {min(steps) * 1e3:7.2f} ms step, {min(floors) * 1e3:.2f} ms floor "
              f"(best: {min(steps) / min(floors) - 1:+.0%}); medians {step_median * 1e3:.2f} / "
              f"{floor_median * 1e3:.2f} ms ({step_median / floor_median - 1:+.0%})")
        with prepacked(model, 4):
            print(f"step, 4 packed:    {step_ms(model, args.repeats, rows=4):7.2f} ms")
            print(f"fast step, 4 packed: {step_ms(model, args.repeats, rows=4, fast=True):5.2f} ms")
        ready: dict[tuple, torch.Tensor] = {}

        def ready_made(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
            key = (tuple(x.shape), self.out_features)
            if key not in ready:
                ready[key] = torch.randn(*x.shape[:-1], self.out_features) * 0.02
            return ready[key]

        linear_forward = torch.nn.Linear.forward
        torch.nn.Linear.forward = ready_made
        try:
            print(f"no matmul:         {step_ms(model, args.repeats):7.2f} ms")
        finally:
            torch.nn.Linear.forward = linear_forward
        print(f"width {narrow.config.n_embd}:         {step_ms(narrow, args.repeats):7.2f} ms")


if __name__ == "__main__":
    main()
