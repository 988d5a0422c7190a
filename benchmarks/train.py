"""Training-step throughput: minigpt2's trainer vs transformers' GPT2LMHeadModel + torch's AdamW, in one run.

    python benchmarks/train.py                                   gpt2 124M shape, batch 2 x 256, fp32 and bf16, CPU
    python benchmarks/train.py --device cuda --batch 16 --seq 1024 --dtypes bf16 --compile --skip_classic \
        --dropout 0 --attn_impls sdpa,triton                     a GPU: our Triton attention raced as well

Both models start from one checkpoint that transformers writes with random weights (the Hub is not needed) and
train on the same batches of the bundled corpus (one BatchLoader seed). Three measurements:

1. Step speed. A full update (forward, loss, backward, gradient clipping to 1.0, AdamW with weight decay) of
   `Trainer.train_step` against the same loop around GPT2LMHeadModel(labels=...) with torch.optim.AdamW, both its
   default implementation and `fused=True` (transformers' Trainer default on torch >= 2.8). Steps alternate
   between the contenders, so that a busy machine slows them alike; the median step is reported. With
   `--attn_impls sdpa,triton` minigpt2 runs once per attention (triton needs --dropout 0: the kernel has no
   attention dropout), and with `--adamw waves,one_pass` (the default) once per AdamW: in cache-sized waves, and in
   one compiled pass (`--compile_optimizer`). Speed-ups are against the first. MFU is achieved
   FLOP/s (6 N + 12 L T C per token, N = parameters without the position table) over the best measured matmul
   FLOP/s of the same dtype on the same device.
2. Useful tokens/s against the classic Trainer recipe: every line of text one sample, padded to 512 tokens, with
   an attention mask and -100 labels on padding. Only non-padding tokens count; packing has no padding at all.
3. On a GPU, MFU against the card's bf16 dense peak as well (H100/H200: 989 TFLOP/s).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel

from contenders import check_device, warmed_up
from minigpt2 import GPTConfig, Tokenizer
from minigpt2.dataset import BatchLoader, PreparedDataset
from minigpt2.optim import param_groups
from minigpt2.pydocs import default_corpus
from minigpt2.train_config import TrainConfig
from minigpt2.trainer import DEFAULT_CORPUS_DIR, Trainer

NOMINAL_BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
LR, WEIGHT_DECAY, BETAS, CLIP = 1e-4, 0.1, (0.9, 0.95), 1.0


def matmul_peak(dtype: torch.dtype, device: str, n: int, repeats: int = 5) -> float:
    """The best FLOP/s of an n x n x n matmul in `dtype` (what autocast runs the model's matmuls in)."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    best = float("inf")
    for _ in range(repeats + 1):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class TheirLoop:
    """The same update around transformers' model and torch's AdamW; batches from a loader with our seed."""

    def __init__(self, checkpoint: str, tokens, batch: int, seq: int, dtype: str, device: str, fused: bool,
                 compile: bool) -> None:
        self.model = GPT2LMHeadModel.from_pretrained(checkpoint, attn_implementation="sdpa").to(device).train()
        groups = [{k: v for k, v in g.items() if k != "names"} for g in param_groups(self.model, WEIGHT_DECAY)]
        self.optimizer = torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=1e-8, fused=fused or None)
        self.forward = torch.compile(self.model) if compile else self.model
        self.loader = BatchLoader(tokens, batch, seq, seed=0)
        self.device, self.dtype = device, dtype

    def step(self, input_ids=None, attention_mask=None, labels=None) -> float:
        if input_ids is None:
            input_ids, _ = self.loader.next_batch()
            labels = input_ids  # the classic usage: the model shifts the labels itself
        input_ids, labels = input_ids.to(self.device), labels.to(self.device)
        mask = attention_mask.to(self.device) if attention_mask is not None else None
        with autocast(self.dtype, self.device):
            loss = self.forward(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), CLIP)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


def autocast(dtype: str, device: str):
    return torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=dtype == "bf16")


def our_trainer(checkpoint: str, corpus: Path, out: Path, batch: int, seq: int, dtype: str, device: str,
                compile: bool, attn_impl: str = "sdpa", adamw: str = "waves") -> Trainer:
    return Trainer(TrainConfig(init=checkpoint, data=str(corpus), out=str(out), batch_size=batch, block_size=seq,
                               max_steps=10**6, lr=LR, warmup_steps=0, weight_decay=WEIGHT_DECAY, beta1=BETAS[0],
                               beta2=BETAS[1], grad_clip=CLIP, dtype=dtype, device=device, compile=compile,
                               attn_impl=attn_impl, compile_optimizer=adamw == "one_pass", eval_interval=0,
                               progress=False, seed=0))


def race(contenders: dict, steps: int, warmup: int) -> dict[str, float]:
    """Median seconds per step of each contender, steps interleaved.

    A contender whose warm-up raises is reported and left out, so that one broken path (a kernel that fails on this
    GPU, say) does not cost the others' figures.
    """
    contenders = warmed_up(contenders, warmup, indent="      ")
    times = {name: [] for name in contenders}
    for _ in range(steps):
        for name, step in contenders.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def profile(step, device: str, step_seconds: float, steps: int = 3, rows: int = 20) -> None:
    """Where a step's time goes: the kernels (on a GPU) or operators (on a CPU) that took the most time.

    On a GPU only the kernels themselves are summed: an operator's device time is that of the kernels it launched,
    so adding operators and kernels would count each kernel twice. Their sum against the measured step time
    (`step_seconds`, from the race) says how long the GPU sat idle waiting for the host.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    on_gpu = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync(device)
    if on_gpu:
        # Device-side events are kernels, copies and fills, plus the spans of annotated regions (an optimizer's
        # step, a compiled region), which cover kernels already counted and the gaps between them.
        events = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA and e.self_device_time_total > 0
                  and not getattr(e, "is_user_annotation", False)]
        self_us = [e.self_device_time_total for e in events]
    else:
        events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
        self_us = [e.self_cpu_time_total for e in events]
    ranked = sorted(zip(self_us, events), key=lambda pair: pair[0], reverse=True)
    total = sum(self_us)
    busy = f" ({total / steps / 1e6 / step_seconds:.0%} of the {step_seconds * 1e3:.2f} ms step)" if on_gpu else ""
    what = "kernel" if on_gpu else "cpu"
    print(f"      profile: {total / steps / 1e3:.2f} ms of {what} time a step{busy}; the {rows} largest:")
    for us, e in ranked[:rows]:
        print(f"      {us / steps / 1e3:>8.2f} ms {us / total:>6.1%} {e.count // steps:>5}x  {e.key[:90]}")


def classic_batches(corpus: Path, batch: int, length: int, count: int, seed: int = 0):
    """Batches of the classic recipe: one line of text per sample, truncated/padded to `length` tokens."""
    tokenizer = Tokenizer()
    lines = []
    with open(corpus / "pydocs.jsonl", encoding="utf-8") as handle:
        for record in handle:
            lines.extend(line for line in json.loads(record)["text"].splitlines() if line.strip())
    generator = torch.Generator().manual_seed(seed)
    for _ in range(count):
        picked = [lines[i] for i in torch.randint(len(lines), (batch,), generator=generator).tolist()]
        ids = torch.full((batch, length), tokenizer.eot_token)
        mask = torch.zeros(batch, length, dtype=torch.long)
        for row, line in enumerate(picked):
            tokens = tokenizer.encode(line)[:length]
            ids[row, :len(tokens)] = torch.tensor(tokens)
            mask[row, :len(tokens)] = 1
        yield ids, mask, ids.masked_fill(mask == 0, -100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per contender")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--dropout", type=float, default=0.1, help="GPT-2's own 0.1 by default")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--attn_impls", default="sdpa", help="minigpt2's attentions to race, e.g. sdpa,triton")
    parser.add_argument("--adamw", default="waves,one_pass", help="minigpt2's AdamW updates to race: waves, one_pass "
                        "(compiled)")
    parser.add_argument("--classic_batch", type=int, default=2)
    parser.add_argument("--skip_classic", action="store_true")
    parser.add_argument("--profile", action="store_true", help="after the race, list where a step of minigpt2's "
                        "first attention spends its time (torch.profiler)")
    args = parser.parse_args()
    impls = args.attn_impls.split(",")
    adamws = args.adamw.split(",")
    if not set(adamws) <= {"waves", "one_pass"}:
        parser.error(f"--adamw {args.adamw}: the updates are waves and one_pass")
    if not set(args.dtypes.split(",")) <= {"fp32", "bf16"}:
        # The transformers loop runs autocast for bf16 only: any other dtype would race it in fp32.
        parser.error(f"--dtypes {args.dtypes}: the dtypes are fp32 and bf16")
    check_device(parser, args.device)
    if "triton" in impls and args.dropout > 0:
        parser.error("--attn_impls triton needs --dropout 0 (the kernel has no attention dropout)")
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()  # keep the table readable: no load reports or progress bars
    transformers.logging.disable_progress_bar()

    shape = GPTConfig.from_preset(args.preset)
    corpus = default_corpus(DEFAULT_CORPUS_DIR)
    tokens = PreparedDataset(corpus).tokens("train")
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.preset}, batch {args.batch} x {args.seq}, dropout {args.dropout}, {name}, torch {torch.__version__}"
          f"{', compiled' if args.compile else ''}")
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        hf_config = GPT2Config(n_layer=shape.n_layer, n_head=shape.n_head, n_embd=shape.n_embd,
                               embd_pdrop=args.dropout, attn_pdrop=args.dropout, resid_pdrop=args.dropout)
        GPT2LMHeadModel(hf_config).save_pretrained(tmp)
        n_matmul = sum(p.numel() for p in GPT2LMHeadModel(hf_config).parameters()) - shape.n_positions * shape.n_embd
        flops_per_token = 6 * n_matmul + 12 * shape.n_layer * args.seq * shape.n_embd
        tokens_per_step = args.batch * args.seq

        print(f"\n{'dtype':<6}{'contender':<42}{'tok/s':>10}{'minigpt2 speed-up':>19}{'MFU':>8}")
        for dtype in args.dtypes.split(","):
            ours = {f"minigpt2 train_step ({impl}, {adamw})": our_trainer(
                tmp, corpus, Path(tmp) / f"out-{dtype}-{impl}-{adamw}", args.batch, args.seq, dtype, args.device,
                args.compile, impl, adamw) for impl in impls for adamw in adamws}
            theirs = TheirLoop(tmp, tokens, args.batch, args.seq, dtype, args.device, False, args.compile)
            fused = TheirLoop(tmp, tokens, args.batch, args.seq, dtype, args.device, True, args.compile)
            seconds = race({**{label: trainer.train_step for label, trainer in ours.items()},
                            "transformers + torch AdamW": theirs.step,
                            "transformers + torch AdamW(fused)": fused.step}, args.steps, args.warmup)
            peak = matmul_peak(torch.bfloat16 if dtype == "bf16" else torch.float32, args.device,
                               8192 if args.device.startswith("cuda") else 2048)
            raced = [label for label in ours if label in seconds]
            first = seconds[raced[0]]
            for contender, s in seconds.items():
                mfu = tokens_per_step * flops_per_token / s / peak
                print(f"{dtype:<6}{contender:<42}{tokens_per_step / s:>10,.0f}{s / first:>18.2f}x{mfu:>8.1%}")
            print(f"{'':<6}MFU against the measured {dtype} matmul peak of {peak / 1e12:.2f} TFLOP/s")
            nominal = next((v for k, v in NOMINAL_BF16_PEAK.items() if k in name), None)
            if nominal and dtype == "bf16":
                for label in raced:
                    ours_flops = tokens_per_step * flops_per_token / seconds[label]
                    print(f"{'':<6}{label} MFU vs {name}'s nominal bf16 peak ({nominal / 1e12:.0f} TFLOP/s): "
                          f"{ours_flops / nominal:.1%}")
            if args.profile:
                profile(ours[raced[0]].train_step, args.device, seconds[raced[0]])
            del ours, theirs, fused

        if not args.skip_classic:
            dtype = args.dtypes.split(",")[0]
            length = 512
            ours = our_trainer(tmp, corpus, Path(tmp) / "out-classic", args.classic_batch, length, dtype,
                               args.device, args.compile)
            theirs = TheirLoop(tmp, tokens, args.classic_batch, length, dtype, args.device, False, args.compile)
            batches = list(classic_batches(corpus, args.classic_batch, length, args.warmup + args.steps))
            useful = sum(int(mask.sum()) for _, mask, _ in batches) / len(batches)
            feed = iter(batches)
            seconds = race({"ours": ours.train_step, "classic": lambda: theirs.step(*next(feed))}, args.steps,
                           args.warmup)
            ours_useful = args.classic_batch * length / seconds["ours"]
            classic_useful = useful / seconds["classic"]
            print(f"\nuseful (non-padding) tokens/s, batch {args.classic_batch} x {length}, {dtype}: minigpt2 packed "
                  f"{ours_useful:,.0f} vs classic line-per-sample padded {classic_useful:,.0f} "
                  f"({1 - useful / (args.classic_batch * length):.0%} padding): {ours_useful / classic_useful:.1f}x")


if __name__ == "__main__":
    main()
