"""Throughput of kernels.flash_attention against torch SDPA's flash backend, causal, on a CUDA GPU.

    python benchmarks/attention.py [--lengths 1024 2048] [--dtypes fp16 bf16] [--tokens 16384] [--heads 16]

Prints TFLOP/s of the forward and of forward+backward for each dtype and length, and ours / SDPA. The batch is
sized so that every run holds `tokens` tokens x `heads` heads (enough programs to fill a large GPU). FLOPs are
counted as the useful ones: the forward does 2 matmuls of 2 T^2 hs, halved by the causal mask, per head, and the
backward 2.5 times that (recomputing q k^T is not counted), as is usual for flash attention.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp16", "bf16"])
    parser.add_argument("--tokens", type=int, default=16384, help="B * T per run (default: 16384)")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-size", type=int, default=64)
    args = parser.parse_args()

    if not torch.cuda.is_available():
        sys.exit("benchmarks/attention.py measures GPU kernels and needs a CUDA GPU; torch.cuda.is_available() is "
                 "False here, so there is nothing to measure.")
    try:
        import triton.testing
    except ImportError:
        sys.exit("benchmarks/attention.py needs triton: pip install 'minigpt2[kernels]'")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's `kernels`, installed or not
    from kernels import flash_attention
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"hs={args.head_size}, causal")
    header = f"{'dtype':>5} {'T':>5} {'B x H':>8} {'pass':>8} {'ours TFLOP/s':>13} {'SDPA TFLOP/s':>13} {'ours/SDPA':>9}"
    print(header)
    print("-" * len(header))
    for dtype_name in args.dtypes:
        for T in args.lengths:
            B, H, hs = max(1, args.tokens // T), args.heads, args.head_size
            q, k, v = (torch.randn(B, H, T, hs, device="cuda", dtype=DTYPES[dtype_name], requires_grad=True)
                       for _ in range(3))
            grad_out = torch.randn_like(q)
            # Sanity first (this also runs the autotuning outside the timed region).
            err = (flash_attention(q, k, v) - sdpa_flash(q, k, v)).abs().max().item()
            if err > 2e-2:
                print(f"warning: {dtype_name} T={T}: outputs differ from SDPA by {err:.3g}", file=sys.stderr)
            flash_attention(q, k, v).backward(grad_out)

            forward_flops = 2 * B * H * T * T * hs  # 2 matmuls x 2 T^2 hs, halved by the causal mask
            for pass_name, flops in (("fwd", forward_flops), ("fwd+bwd", 3.5 * forward_flops)):
                tflops = []
                for attention in (flash_attention, sdpa_flash):
                    if pass_name == "fwd":
                        def step(attention=attention):
                            with torch.no_grad():
                                attention(q, k, v)
                    else:
                        def step(attention=attention):
                            attention(q, k, v).backward(grad_out)
                    ms = triton.testing.do_bench(step, warmup=25, rep=100, grad_to_none=[q, k, v],
                                                  return_mode="median")
                    tflops.append(flops / (ms * 1e-3) / 1e12)
                print(f"{dtype_name:>5} {T:>5} {f'{B}x{H}':>8} {pass_name:>8} {tflops[0]:>13.1f} {tflops[1]:>13.1f} "
                      f"{tflops[0] / tflops[1]:>9.2f}")


if __name__ == "__main__":
    main()
