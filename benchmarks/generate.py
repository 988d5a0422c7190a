"""Decoding speed of minigpt2's generate() vs transformers' GPT2LMHeadModel.generate, same weights, in one run.

    python benchmarks/generate.py [--preset gpt2] [--new 64] [--repeats 5] [--dtypes fp32,bf16] [--threads N]

Both models load one checkpoint that transformers writes with random weights (no Hub needed). Three workloads, each
timed alternately for the two libraries, best of --repeats after a warm-up:

    greedy   batch 1, greedy search
    beam4    batch 1, num_beams=4
    sample8  batch 8, do_sample=True, temperature=0.8, top_p=0.9 (and transformers' default top_k=50)

tokens/s counts the new tokens of the returned sequences (batch x new). The weight-streaming floor is the time of one
pass of matrix-vector products over every weight matrix, in whichever memory layout multiplies fastest (what any
batch-1 decoding step must at least do on a CPU, where a step is bound by reading the weights); greedy's decoding
step (time per token after the prompt's prefill) is reported against it. Each workload also says whether both
libraries produced the same tokens (sampling: same torch seed; in bf16 the two may round differently and part ways).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from minigpt2 import GPT, GPTConfig, prepack

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
WORKLOADS = {
    "greedy": (1, dict(do_sample=False)),
    "beam4": (1, dict(num_beams=4)),
    "sample8": (8, dict(do_sample=True, temperature=0.8, top_p=0.9)),
}


def weight_streaming_floor(model: GPT, rows: int = 1, repeats: int = 10, passes: int = 1) -> float:
    """Seconds for one product of `rows` rows with every weight matrix of the model (the head included).

    The fastest of three ways to hold the weights is taken, so that the floor is what the matrix library can do at
    best: nn.Linear's (out, in) layout, the transposed (in, out) layout of OpenAI's Conv1D that transformers keeps,
    and MKL's packed copy (prepack.py). With `passes` > 1, the time of that many passes in a row divided by their
    number, the same statistic as a decoding step averaged over the steps of one generate() call; the best of
    `repeats` such measurements either way.
    """
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    # Each layout built from the weights whatever layout they have now (generate() may have re-laid them out).
    weights = [m.weight.detach().contiguous() for m in linears]
    inputs = [torch.ones(rows, w.shape[1], dtype=w.dtype, device=w.device) for w in weights]
    layouts = {"out-major": lambda: [F.linear(x, w) for x, w in zip(inputs, weights)]}
    transposed = [w.t().contiguous().t() for w in weights]
    layouts["in-major"] = lambda: [F.linear(x, w) for x, w in zip(inputs, transposed)]
    if all(prepack.supported(m) for m in linears):
        packed = [prepack.pack(m, rows) for m in linears]
        layouts["packed"] = lambda: [torch.ops.mkl._mkl_linear(x, p, w, None, rows)
                                    for x, p, w in zip(inputs, packed, weights)]
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats + 1):
            for one_pass in layouts.values():  # alternated, so that load from elsewhere slows them alike
                start = time.perf_counter()
                for _ in range(passes):
                    one_pass()
                best = min(best, (time.perf_counter() - start) / passes)
    return best


def time_generate(model, prompts: torch.Tensor, new: int, settings: dict, seed: int) -> tuple[float, torch.Tensor]:
    torch.manual_seed(seed)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new, pad_token_id=50256,
                             **settings)
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    parser.add_argument("--new", type=int, default=64, help="new tokens per sequence")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    for flag, names, known in (("--dtypes", args.dtypes, DTYPES), ("--workloads", args.workloads, WORKLOADS)):
        if not set(names.split(",")) <= set(known):
            parser.error(f"{flag} {names}: choose from {', '.join(known)}")
    if "greedy" in args.workloads.split(",") and args.new < 2:
        parser.error(f"--new {args.new}: greedy's decoding step is timed over the tokens after the first; pass "
                     "--new 2 or more")
    torch.set_num_threads(args.threads)

    shape = GPTConfig.from_preset(args.preset)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        hf_config = GPT2Config(n_layer=shape.n_layer, n_head=shape.n_head, n_embd=shape.n_embd)
        GPT2LMHeadModel(hf_config).save_pretrained(tmp)
        ours = GPT.from_pretrained(tmp)
        theirs = GPT2LMHeadModel.from_pretrained(tmp, attn_implementation="sdpa").eval()
    print(f"{args.preset}, prompt {args.prompt} + {args.new} new tokens, cpu, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, best of {args.repeats}")
    print(f"{'workload':<10}{'dtype':<6}{'minigpt2 tok/s':>16}{'transformers tok/s':>20}{'ratio':>8}  same tokens")
    for dtype_name in args.dtypes.split(","):
        ours.to(DTYPES[dtype_name])
        theirs.to(DTYPES[dtype_name])
        for name in args.workloads.split(","):
            batch, settings = WORKLOADS[name]
            prompts = torch.randint(0, shape.vocab_size, (batch, args.prompt),
                                    generator=torch.Generator().manual_seed(1))
            time_generate(ours, prompts, 4, settings, seed=0)  # warm-up
            time_generate(theirs, prompts, 4, settings, seed=0)
            # Other processes may share the cores: alternate the two libraries and keep each one's best time.
            best = dict.fromkeys(("ours", "theirs", "prefill", "floor", "floor_avg"), float("inf"))
            for repeat in range(args.repeats):
                t_ours, out_ours = time_generate(ours, prompts, args.new, settings, seed=repeat)
                t_theirs, out_theirs = time_generate(theirs, prompts, args.new, settings, seed=repeat)
                best["ours"], best["theirs"] = min(best["ours"], t_ours), min(best["theirs"], t_theirs)
                if name == "greedy":
                    best["prefill"] = min(best["prefill"], time_generate(ours, prompts, 1, settings, seed=0)[0])
                    best["floor"] = min(best["floor"], weight_streaming_floor(ours, repeats=2))
                    best["floor_avg"] = min(best["floor_avg"], weight_streaming_floor(ours, repeats=0,
                                                                                      passes=args.new - 1))
            same = out_ours.tolist() == out_theirs.tolist()
            new = out_ours.shape[1] - args.prompt
            print(f"{name:<10}{dtype_name:<6}{batch * new / best['ours']:>16.1f}{batch * new / best['theirs']:>20.1f}"
                  f"{best['theirs'] / best['ours']:>7.2f}x  {'yes' if same else 'no'}", flush=True)
            if name == "greedy":
                # A decoding step, without the prompt's prefill: (time for `new` tokens - time for 1) / (new - 1).
                step = (best["ours"] - best["prefill"]) / (new - 1)
                print(f"{'':<16}greedy step {step * 1e3:.2f} ms vs weight-streaming floor: averaged over {new - 1} "
                      f"passes {best['floor_avg'] * 1e3:.2f} ms ({step / best['floor_avg'] - 1:+.1%}), best single "
                      f"pass {best['floor'] * 1e3:.2f} ms ({step / best['floor'] - 1:+.1%})", flush=True)


if __name__ == "__main__":
    main()
