"""Two parts of a gpt2 training step timed alone, each against the alternative that could replace it.

    python benchmarks/step_parts.py                  CPU, a small batch
    python benchmarks/step_parts.py --device cuda    a GPU, 16 x 1,024 tokens as in the MFU benchmark

1. The tied head and the loss, forward and backward, bf16 autocast, eager and compiled: logits over the
   50,257-token vocabulary as a plain product writes them, against `model.aligned_linear` (what the model's head
   uses on a GPU): a table padded with zero rows to a multiple of 64 and a view of the real columns. A row of
   50,257 bf16 logits does not start on a 16-byte boundary, and matmul libraries have faster kernels for aligned
   rows (nanoGPT pads its vocabulary for this). The forward product is also timed alone in both layouts.
2. One optimizer update of gpt2's 124M fp32 parameters, clipping included: minigpt2's grad_norm + AdamW with the
   clipping factor folded in (multi-tensor operations in waves, and one compiled pass per weight), against
   clip_grad_norm_ + torch.optim.AdamW (foreach, and fused).

Each time is the median of `--repeats` runs after warm-up, in ms (CUDA events on a GPU); the optimizer's
contenders run alternately.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from contenders import check_device, warmed_up
from minigpt2 import GPT, GPTConfig
from minigpt2.model import aligned_linear
from minigpt2.optim import AdamW, clip_factor, grad_norm, param_groups

LR, BETAS, WEIGHT_DECAY, CLIP = 1e-4, (0.9, 0.95), 0.1, 1.0


def elapsed_ms(fn: Callable[[], object], device: str) -> float:
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    begin = time.perf_counter()
    fn()
    return (time.perf_counter() - begin) * 1e3


def median_ms(fn: Callable[[], object], device: str, repeats: int, warmup: int = 3) -> float:
    return alternated_ms({"fn": fn}, device, repeats, warmup)["fn"]


def alternated_ms(contenders: dict[str, Callable[[], object]], device: str, repeats: int,
                  warmup: int = 3) -> dict[str, float]:
    """Median ms of each contender, their runs alternated so that load from elsewhere slows them alike.

    A contender whose warm-up raises (a compile that fails on this machine, say) is reported and left out.
    """
    contenders = warmed_up(contenders, warmup, indent="  ", report=False)
    times: dict[str, list[float]] = {label: [] for label in contenders}
    for _ in range(repeats):
        for label, fn in contenders.items():
            times[label].append(elapsed_ms(fn, device))
    return {label: statistics.median(t) for label, t in times.items()}


def head_and_loss(product: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], hidden: torch.Tensor,
                  weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    with torch.autocast(hidden.device.type, dtype=torch.bfloat16):
        logits = product(hidden, weight)  # (N, C) @ (C, V) -> (N, V)
    return F.cross_entropy(logits.float(), targets)


def time_head(device: str, tokens: int, repeats: int) -> None:
    config = GPTConfig.from_preset("gpt2")
    weight = (torch.randn(config.vocab_size, config.n_embd, device=device) * 0.02).requires_grad_()
    hidden = torch.randn(tokens, config.n_embd, device=device, requires_grad=True)
    targets = torch.randint(config.vocab_size, (tokens,), device=device)
    print(f"head + loss, {tokens} tokens x {config.n_embd} -> {config.vocab_size} (aligned: rows of "
          f"{config.vocab_size + (-config.vocab_size % 64)}), bf16 autocast, forward+backward, ms:")
    losses = {}
    for name, product in (("unaligned rows", F.linear), ("aligned rows", aligned_linear)):
        fn = functools.partial(head_and_loss, product)
        for mode, run in (("eager", fn), ("compiled", torch.compile(fn))):
            def step(run=run) -> None:
                run(hidden, weight, targets).backward()

            losses[name, mode] = run(hidden, weight, targets).item()
            print(f"  {name:<15} {mode:<9} {median_ms(step, device, repeats):8.2f}")
    spread = max(losses.values()) - min(losses.values())
    print(f"  the four losses agree to {spread:.2g} ({min(losses.values()):.6f})")
    h16, w16 = hidden.detach().bfloat16(), weight.detach().bfloat16()
    plain = median_ms(lambda: h16 @ w16.T, device, repeats)
    aligned = median_ms(lambda: aligned_linear(h16, w16), device, repeats)
    print(f"  the forward product alone, bf16: unaligned {plain:.2f}, aligned {aligned:.2f} ({plain / aligned:.2f}x)")


def time_optimizer(device: str, repeats: int) -> None:
    model = GPT(GPTConfig.from_preset("gpt2")).to(device)
    params = list(model.parameters())
    # A gradient norm of 0.5, under CLIP: clip_grad_norm_ scales the gradients in place, and repeated runs above
    # the limit would shrink them into denormal floats, which a CPU computes with many times slower.
    for p in params:
        p.grad = torch.randn_like(p)
    total = grad_norm(params).item()
    for p in params:
        p.grad *= 0.5 / total
    # Fresh group dicts for each optimizer: torch's write their settings (foreach, fused, ...) into the dicts given,
    # and a second optimizer built on the same dicts would take the first one's.
    contenders = {}
    for label, compiled in (("waves", False), ("one pass, compiled", True)):
        ours = AdamW(param_groups(model, WEIGHT_DECAY), lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY,
                     compiled=compiled)

        def our_update(ours=ours) -> None:
            factor = clip_factor(grad_norm(params).item(), CLIP)
            ours.step(grad_scale=factor)

        contenders[f"minigpt2 AdamW, {label} (clip folded in)"] = our_update
    for label, kwargs in (("torch AdamW, foreach", dict(foreach=True)), ("torch AdamW, fused", dict(fused=True))):
        plain_groups = [{k: v for k, v in g.items() if k != "names"} for g in param_groups(model, WEIGHT_DECAY)]
        theirs = torch.optim.AdamW(plain_groups, lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY, **kwargs)
        assert all(group[name] for group in theirs.param_groups for name in kwargs)

        def their_update(theirs=theirs) -> None:
            torch.nn.utils.clip_grad_norm_(params, CLIP)
            theirs.step()

        contenders[f"clip_grad_norm_ + {label}"] = their_update
    numel = sum(p.numel() for p in params)
    print(f"optimizer update of {numel / 1e6:.1f}M fp32 parameters ({len(params)} tensors), clipping to {CLIP}, ms:")
    for label, ms in alternated_ms(contenders, device, repeats).items():
        print(f"  {label:<50} {ms:8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, help="rows of the head (default: 16,384 on a GPU, 512 on a CPU)")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    on_gpu = check_device(parser, args.device)
    tokens = args.tokens or (16384 if on_gpu else 512)
    name = torch.cuda.get_device_name(args.device) if on_gpu else "CPU"
    print(f"{name}, torch {torch.__version__}")
    time_head(args.device, tokens, args.repeats)
    time_optimizer(args.device, args.repeats)


if __name__ == "__main__":
    main()
