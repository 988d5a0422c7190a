"""Forward throughput of minigpt2 vs transformers' GPT2LMHeadModel on the same weights, in one run.

    python benchmarks/forward.py [--preset gpt2] [--batch 4] [--seq 512] [--repeats 5]

Both models are loaded from one checkpoint that transformers writes with random weights (the Hub is not needed),
then timed alternately, fp32 and bf16 autocast, on the same input. Prints tokens/s and ours/theirs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from contenders import check_device
from minigpt2 import GPT, GPTConfig


def best_time(fn, repeats: int) -> tuple[float, float]:
    fn()  # warm-up: allocator, kernels, caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device_type = "cuda" if check_device(parser, args.device) else "cpu"

    shape = GPTConfig.from_preset(args.preset)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        GPT2LMHeadModel(GPT2Config(n_layer=shape.n_layer, n_head=shape.n_head, n_embd=shape.n_embd)).save_pretrained(tmp)
        theirs = GPT2LMHeadModel.from_pretrained(tmp, attn_implementation="sdpa").eval().to(args.device)
        ours = GPT.from_pretrained(tmp).eval().to(args.device)
    x = torch.randint(0, shape.vocab_size, (args.batch, args.seq), device=args.device)
    tokens = args.batch * args.seq
    print(f"{args.preset}, batch {args.batch} x {args.seq}, {args.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'dtype':<10}{'minigpt2 tok/s':>16}{'transformers tok/s':>20}{'ratio':>8}")
    for dtype in ("fp32", "bf16"):
        autocast = torch.autocast(device_type, dtype=torch.bfloat16, enabled=dtype == "bf16")

        def run(model, logits_of):
            with torch.no_grad(), autocast:
                logits_of(model(x))
            if device_type == "cuda":
                torch.cuda.synchronize()

        ours_t, _ = best_time(lambda: run(ours, lambda out: out), args.repeats)
        theirs_t, _ = best_time(lambda: run(theirs, lambda out: out.logits), args.repeats)
        print(f"{dtype:<10}{tokens / ours_t:>16,.0f}{tokens / theirs_t:>20,.0f}{theirs_t / ours_t:>7.2f}x")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
