"""Where a CPU decoding step's time goes: matrix products, the rest of the model, and Python.

    python benchmarks/decode_breakdown.py [--preset gpt2] [--repeats 5] [--threads N]

Prints, for minigpt2's cached decoding step (fp32, weights in `use_decoding_layout`):

    floor      one pass of matrix-vector products over every weight matrix, for 1, 4 and 8 rows (what a greedy,
               4-beam and 8-sample step must at least do)
    step       the model's step for one new token (batch 1, 64 tokens in the cache)
    no matmul  the same step with every nn.Linear returning a ready-made result: the rest of the model
    width 96   the same step on a model of the same depth and heads but width 96: Python and dispatch alone

Background for docs/benchmarks.md (Generation); the comparison with transformers is `benchmarks/generate.py`.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from minigpt2 import GPT, GPTConfig
from minigpt2.generate import use_decoding_layout
from minigpt2.kv_cache import KVCache


def best_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def floor_ms(model: GPT, rows: int, repeats: int) -> float:
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = [torch.randn(rows, w.shape[1]) for w in weights]
    return best_ms(lambda: [F.linear(x, w) for x, w in zip(inputs, weights)], repeats)


def step_ms(model: GPT, repeats: int, past: int = 64) -> float:
    """One cached step for a single token, with `past` tokens already in the cache."""
    cache = KVCache(model.config, 1, past + 1)
    model(torch.randint(0, model.config.vocab_size, (1, past)), kv_cache=cache)
    token = torch.tensor([[5]])

    def step() -> None:
        model(token, kv_cache=cache)
        cache.length -= 1  # the next step overwrites the same position

    return best_ms(step, repeats * 10)


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
        use_decoding_layout(m)
    print(f"{args.preset}, cpu fp32, {torch.get_num_threads()} threads, best of {args.repeats}")
    with torch.inference_mode():
        for rows in (1, 4, 8):
            print(f"floor, {rows} row(s): {floor_ms(model, rows, args.repeats):7.2f} ms")
        print(f"step:              {step_ms(model, args.repeats):7.2f} ms")
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
