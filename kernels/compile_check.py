"""Compile the flash-attention kernels for a GPU architecture on a machine that has no GPU.

    python -m kernels.compile_check [--arch 80 90] [--dtypes fp16 bf16 fp32] [--head_dims 64] [--padding both] [--json]

Triton's interpreter (TRITON_INTERPRET=1), which the CPU tests use, runs the kernels' Python and checks their
arithmetic, but never lowers them to a GPU: a tile too small for tl.dot, an autotuning candidate that needs more
shared memory than the card has, or PTX that ptxas rejects would only show on the first launch on a GPU. Triton can
compile for a target named by hand instead of the one a driver reports, so this goes the whole way a launch goes,
Triton IR -> LLVM -> PTX -> the ptxas bundled with triton -> a cubin, for every autotuning candidate, and launches
nothing. It prints what each candidate takes: dynamic shared memory (checked against the card's per-block limit),
registers per thread, and stack bytes per thread (registers spilled to memory: slow, not wrong).

The kernels must be defined for a GPU, so TRITON_INTERPRET must be unset in this process.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# The names, not the module: the package's `flash_attention` attribute is the function of that name.
from .flash_attention import (_DOT_DTYPES, _HEAD_DIMS, INTERPRET, _bwd_delta_kernel, _bwd_dkdv_kernel,
                              _bwd_dq_kernel, _fwd_kernel)

# The largest dynamic shared memory one block may opt into, per compute capability (CUDA's
# cudaDevAttrMaxSharedMemoryPerBlockOptin). Triton refuses to launch a kernel that asks for more.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
SMALLEST_SHARED_LIMIT = min(SHARED_LIMIT.values())

# Input precisions by name: the element type of q, k, v and the tl.dot precision a launch picks for it
# (fp32 inputs multiply exactly unless torch allows TF32 for its own fp32 matmuls).
DTYPES = {"fp16": (torch.float16, "tf32"), "bf16": (torch.bfloat16, "tf32"), "fp32": (torch.float32, "ieee"),
          "tf32": (torch.float32, "tf32")}

# The autotuned kernels and the delta kernel, whose launch fixes its one tile (see _backward in flash_attention.py).
KERNELS = {
    "forward": (_fwd_kernel.fn, _fwd_kernel.configs),
    "backward delta": (_bwd_delta_kernel, [triton.Config({"BLOCK_M": 64}, num_warps=4, num_stages=3)]),
    "backward dk/dv": (_bwd_dkdv_kernel.fn, _bwd_dkdv_kernel.configs),
    "backward dq": (_bwd_dq_kernel.fn, _bwd_dq_kernel.configs),
}
_INTERPRETED = ("the kernels were defined for Triton's CPU interpreter (TRITON_INTERPRET was set when kernels was "
                "imported); compiling for a GPU needs them defined for one: unset TRITON_INTERPRET")
_TENSORS_OF_INPUT_DTYPE = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"}
_TRITON_POINTER = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}


@dataclasses.dataclass
class Compiled:
    """One kernel compiled for one architecture, input dtype, head size, padding choice and autotuning config."""

    kernel: str
    arch: int
    dtype: str
    head_dim: int
    padding: bool
    config: str
    last_config: bool  # the list's final candidate, meant to fit on every card
    shared: int = 0  # bytes of dynamic shared memory a launch asks for
    registers: int = 0  # per thread
    stack: int = 0  # bytes of stack per thread: registers spilled to (cached) local memory
    error: str = ""

    @property
    def fits(self) -> bool:
        return not self.error and self.shared <= SHARED_LIMIT[self.arch]


def _signature(jit_fn: triton.JITFunction, dtype: torch.dtype) -> dict[str, str]:
    """Triton's type of every argument, as a launch with (B, nh, T, hs) tensors of `dtype` would specialise them."""
    signature = {}
    for param in jit_fn.params:
        name = param.name
        if param.is_constexpr:
            signature[name] = "constexpr"
        elif name in _TENSORS_OF_INPUT_DTYPE:
            signature[name] = _TRITON_POINTER[dtype]
        elif name in ("LSE", "DELTA"):
            signature[name] = "*fp32"
        elif name == "KEY_REAL":
            signature[name] = "*i8"
        elif name in ("qk_scale", "sm_scale"):
            signature[name] = "fp32"
        else:  # sizes and strides
            signature[name] = "i32"
    return signature


def _resources(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, stack bytes per thread) of a cubin, read by the cuobjdump bundled with triton."""
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        report = subprocess.run([str(cuobjdump), "--dump-resource-usage", str(path)], capture_output=True,
                                text=True, check=True).stdout
    fields = dict(item.split(":", 1) for line in report.splitlines() if "REG:" in line for item in line.split())
    return int(fields["REG"]), int(fields["STACK"])


def compile_one(kernel: str, arch: int, dtype: str, head_dim: int, padding: bool, config_index: int) -> Compiled:
    """Compile one kernel variant to a cubin for compute capability `arch`; compile errors are recorded, not raised."""
    if INTERPRET:
        raise RuntimeError(_INTERPRETED)
    jit_fn, configs = KERNELS[kernel]
    config = configs[config_index]
    torch_dtype, input_precision = DTYPES[dtype]
    result = Compiled(kernel, arch, dtype, head_dim, padding, _describe(config),
                      last_config=config_index == len(configs) - 1)
    constexprs = dict(HEAD_DIM=head_dim, HAS_PAD=padding, DOT_DTYPE=_DOT_DTYPES[torch_dtype],
                      INPUT_PRECISION=input_precision, **config.kwargs)
    names = [param.name for param in jit_fn.params]
    signature = _signature(jit_fn, torch_dtype)
    # Every pointer a launch passes is 16-byte aligned (torch allocates on 512-byte boundaries, and the model's
    # q/k/v views start at multiples of n_embd elements), and Triton specialises a launch on that.
    aligned = {(names.index(name),): [["tt.divisibility", 16]] for name, kind in signature.items()
               if kind.startswith("*")}
    source = ASTSource(jit_fn, signature, attrs=aligned,
                       constexprs={name: value for name, value in constexprs.items() if name in names})
    try:
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                  options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
    except Exception as error:  # a compile failure is this tool's finding, reported with the others
        result.error = f"{type(error).__name__}: {str(error).strip().splitlines()[-1]}"
        return result
    result.shared = compiled.metadata.shared
    result.registers, result.stack = _resources(compiled.asm["cubin"])
    return result


def _describe(config: triton.Config) -> str:
    tiles = " ".join(f"{key}={value}" for key, value in config.kwargs.items())
    return f"{tiles} warps={config.num_warps} stages={config.num_stages}"


def compile_all(archs: list[int], dtypes: list[str], head_dims: list[int], paddings: list[bool],
                last_only: bool = False) -> list[Compiled]:
    """Every kernel x autotuning config (or only each list's last) x the given architectures, dtypes, head sizes
    and padding choices."""
    results = []
    for arch in archs:
        for kernel, (_, configs) in KERNELS.items():
            indices = [len(configs) - 1] if last_only else range(len(configs))
            for dtype in dtypes:
                for head_dim in head_dims:
                    for padding in paddings:
                        results.extend(compile_one(kernel, arch, dtype, head_dim, padding, i) for i in indices)
    return results


def problems(results: list[Compiled]) -> list[str]:
    """What would break a launch: a compile error, or a kernel variant none of whose candidates fits the card."""
    found = [f"{r.kernel} sm_{r.arch} {r.dtype} hs={r.head_dim} pad={r.padding} [{r.config}]: {r.error}"
             for r in results if r.error]
    variants: dict[tuple, list[Compiled]] = {}
    for r in results:
        variants.setdefault((r.kernel, r.arch, r.dtype, r.head_dim, r.padding), []).append(r)
    for (kernel, arch, dtype, head_dim, padding), candidates in variants.items():
        if not any(c.fits for c in candidates):
            found.append(f"{kernel} sm_{arch} {dtype} hs={head_dim} pad={padding}: no candidate fits in "
                         f"{SHARED_LIMIT[arch]} bytes of shared memory")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", choices=sorted(SHARED_LIMIT), default=[80, 90],
                        help="compute capabilities to compile for (default: 80 90, A100 and H100/H200)")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp16", "bf16", "fp32"])
    parser.add_argument("--head_dims", type=int, nargs="+", choices=_HEAD_DIMS, default=[64])
    parser.add_argument("--padding", choices=["no", "yes", "both"], default="both",
                        help="compile without the key-padding mask, with it, or both (default)")
    parser.add_argument("--last_only", action="store_true",
                        help="only each kernel's last autotuning candidate, the one meant to fit on every card")
    parser.add_argument("--json", action="store_true", help="print one JSON object per compiled variant")
    args = parser.parse_args(argv)
    if INTERPRET:
        parser.error(_INTERPRETED)

    paddings = {"no": [False], "yes": [True], "both": [False, True]}[args.padding]
    results = compile_all(args.arch, args.dtypes, args.head_dims, paddings, args.last_only)
    if args.json:
        for r in results:
            print(json.dumps(dataclasses.asdict(r) | {"fits": r.fits}))
    else:
        print(f"triton {triton.__version__}; shared memory in bytes per block, registers and stack (spill) bytes "
              "per thread")
        header = f"{'kernel':<15} {'arch':>6} {'dtype':>5} {'hs':>4} {'pad':>4} {'config':<40} {'shared':>7} " \
                 f"{'regs':>5} {'stack':>6}"
        print(header)
        print("-" * len(header))
        for r in results:
            tail = r.error if r.error else f"{r.shared:>7} {r.registers:>5} {r.stack:>6}" + \
                ("" if r.fits else "  exceeds the card's shared memory")
            padding = "yes" if r.padding else "no"
            print(f"{r.kernel:<15} {'sm_' + str(r.arch):>6} {r.dtype:>5} {r.head_dim:>4} {padding:>4} "
                  f"{r.config:<40} {tail}")
    found = problems(results)
    for line in found:
        print(f"problem: {line}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
