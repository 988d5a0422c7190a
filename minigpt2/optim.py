"""AdamW, written out, and the parameter groups that say which weights decay.

One AdamW update of a parameter p with gradient g (step t counts from 1; m, v start at zero):

    p <- p * (1 - lr * weight_decay)          decoupled weight decay: shrink the weight, outside the gradient
    m <- beta1 * m + (1 - beta1) * g          running mean of gradients (first moment)
    v <- beta2 * v + (1 - beta2) * g^2        running mean of squared gradients (second moment)
    m_hat = m / (1 - beta1^t)                 bias correction: m and v start at 0 and would be too small early on
    v_hat = v / (1 - beta2^t)
    p <- p - lr * m_hat / (sqrt(v_hat) + eps)

"Decoupled" (Loshchilov & Hutter) is what separates AdamW from Adam with an L2 penalty: the decay is not added to g,
so it is not divided by sqrt(v) and every weight shrinks at the same relative rate. This is the update of
torch.optim.AdamW; tests/test_optim.py checks that the two follow the same trajectory over many steps, to rounding.

Which parameters decay: as transformers' Trainer decides, every weight except biases and LayerNorm parameters.
Decaying a bias or a LayerNorm gain towards zero only fights the normalisation; matrices and embeddings are what the
regulariser is for.

Why it is fast. An optimizer step does a handful of flops per weight but must stream four arrays (weight, grad, m, v)
through memory, so its speed is memory bandwidth. Written as whole-tensor operations, as torch's default CPU AdamW
is, a step sweeps each 124M-element array through DRAM several times over. Here, on a CPU:

- Waves. The parameters are cut into pieces, and pieces are grouped into waves of about `chunk_numel` elements.
  All operations of the update (seven, eight with clipping) run on one wave while it sits in the cache, before the
  next wave is touched, so each array crosses the memory bus about once per step. Each operation is one
  multi-tensor (`torch._foreach_*`) call over the wave's pieces: small tensors share calls, and there is no
  per-parameter Python loop.
- Threads. Waves are shared among `threads` worker threads, each working in its own core's cache, much as a fused
  C++ kernel splits its loop. Pieces are no larger than ATen's parallel grain, so every operation runs in
  the thread that called it: the threads never wait for each other until the step ends. (Splitting each small
  operation across torch's thread pool instead costs a synchronisation per operation, thousands per step, which on
  a busy machine is slower than torch's default; see docs/benchmarks.md.)

Measured on a 2-core CPU: 1.5x faster than torch's default CPU AdamW on a quiet machine, 1.8x on a busy one.
Every element goes through the same operations whatever the wave and thread layout, so results do not depend on the
number of threads. On a GPU the whole group is one wave: there foreach calls are fused multi-tensor kernels, and
launch overhead, not cache, is what matters.

One pass (`compiled=True`). Even in cache, seven operations are seven loops, each called from Python. torch.compile
turns `_one_pass`, the update of one parameter written as plain tensor arithmetic, into a single loop (a C++ one on
a CPU, a Triton kernel on a GPU) that reads weight, gradient and moments once and writes weight and moments once,
as torch's `fused=True` C++ kernel does: about 3x faster than the waves on a 2-core CPU, as fast as torch's fused
kernel. It is compiled with dynamic shapes, once per tensor rank (matrices, vectors), not once per parameter shape,
and the scalars travel as a tensor, so a new learning rate or step is new data rather than a recompile. The cost:
seconds of compiling at the first step, a C++ compiler on a CPU, and one call per parameter, each with some tens
of microseconds of host work (on a GPU that may outweigh the pass; not measured there yet).
`train.py --compile_optimizer` switches it on.
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import nn

from .errors import CheckpointError, ConfigError, first_line

CPU_WAVE_NUMEL = 1 << 17  # 128K elements = 512 KiB per fp32 array: a wave's five arrays about fill a core's L2
PIECE_NUMEL = 1 << 15  # at most ATen's parallel grain: an operation on a piece runs in the calling thread


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two optimizer groups: weights that decay, and biases/LayerNorm parameters that do not.

    Tied parameters (GPT-2's lm_head and wte) appear once. Each group carries `names`, the parameter names in order,
    which checkpoints use to store optimizer state by name rather than by position.
    """
    no_decay_ids = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if isinstance(module, nn.LayerNorm) or name == "bias":
                no_decay_ids.add(id(param))
    decay, no_decay = ([], []), ([], [])
    for name, param in model.named_parameters():  # yields each tied tensor once
        if not param.requires_grad:
            continue
        names, params = no_decay if id(param) in no_decay_ids else decay
        names.append(name)
        params.append(param)
    return [{"params": decay[1], "names": decay[0], "weight_decay": weight_decay},
            {"params": no_decay[1], "names": no_decay[0], "weight_decay": 0.0}]


class AdamW(torch.optim.Optimizer):
    """AdamW with decoupled weight decay and bias correction; see the module docstring for the update.

    params: parameters or param groups (e.g. from `param_groups`). chunk_numel: elements per wave of the step (see
    the module docstring); "auto" picks cache-sized waves on CPU and whole groups on GPU, None means whole groups.
    threads: CPU worker threads for the waves (default: torch.get_num_threads()). compiled: update each parameter in
    one pass compiled by torch.compile instead of in waves (see the module docstring); the first step compiles.
    State per parameter: `step` (int), `exp_avg` (m) and `exp_avg_sq` (v), shaped like the parameter.
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01,
                 chunk_numel: int | str | None = "auto", threads: int | None = None, compiled: bool = False) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ConfigError(f"AdamW needs lr, eps and weight_decay >= 0, got {lr}, {eps}, {weight_decay}")
        if not all(0.0 <= beta < 1.0 for beta in betas):
            raise ConfigError(f"AdamW betas must be in [0, 1), got {betas}")
        if not (chunk_numel in ("auto", None) or (isinstance(chunk_numel, int) and chunk_numel > 0)):
            raise ConfigError(f"chunk_numel must be 'auto', None or a positive int, got {chunk_numel!r}")
        self.chunk_numel = chunk_numel
        self.threads = threads
        self.compiled = compiled
        self._pool: ThreadPoolExecutor | None = None
        self._pool_size = 0
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None, *, grad_scale: float | None = None):
        """One update of every parameter that has a gradient.

        grad_scale: use the gradients multiplied by this factor (e.g. the clipping factor from `clip_factor`). The
        factor is applied inside the update, saving clip_grad_norm_'s separate pass over every gradient; the .grad
        tensors themselves are left as they are.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            # Parameters with the same step count share their bias corrections (normally that is all of them);
            # a multi-tensor call wants one device and dtype.
            buckets: dict[tuple, list[torch.Tensor]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ConfigError("AdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                buckets[state["step"], p.device, p.dtype].append(p)
            for (step, _, _), params in buckets.items():
                self._update(group, step, params, grad_scale)
        return loss

    def _update(self, group: dict, step: int, params: list[torch.Tensor], grad_scale: float | None) -> None:
        lr, (beta1, beta2), eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        scale = 1.0 if grad_scale is None else grad_scale
        # The bias corrections are folded into two scalars, as in Kingma & Ba's "more efficient" form:
        # lr * m_hat / (sqrt(v_hat) + eps) == (lr * sqrt(c2) / c1) * m / (sqrt(v) + eps * sqrt(c2)), c = 1 - beta^t.
        c2_sqrt = math.sqrt(1 - beta2 ** step)
        hyper = _Hyper(decay=1 - lr * weight_decay, beta1=beta1, beta2=beta2, scale=scale, eps=eps * c2_sqrt,
                       step_size=lr * c2_sqrt / (1 - beta1 ** step))
        arrays = [(p, p.grad, self.state[p]["exp_avg"], self.state[p]["exp_avg_sq"]) for p in params]
        if self.compiled:
            _one_pass_each(hyper, arrays)
            return
        wave_numel = self._wave_numel(params[0])
        flat, rest = [], []
        for quad in arrays:  # (p, g, m, v)
            (flat if wave_numel is not None and _flattenable(quad) else rest).append(quad)
        if rest:  # whole tensors, one multi-tensor call per operation
            _apply(hyper, *(list(column) for column in zip(*rest)))
        if not flat:
            return
        waves = list(_waves(flat, wave_numel))
        workers = max(1, min(self.threads or torch.get_num_threads(), len(waves)))
        jobs = [(waves[i::workers], hyper) for i in range(workers)]
        if workers == 1:
            _run(*jobs[0])
        else:
            if self._pool is None or self._pool_size < workers:  # one pool for every group and step
                if self._pool is not None:
                    self._pool.shutdown(wait=False)
                self._pool_size = max(workers, self.threads or torch.get_num_threads())
                self._pool = ThreadPoolExecutor(max_workers=self._pool_size, thread_name_prefix="adamw")
            list(self._pool.map(lambda job: _run(*job), jobs))

    def _wave_numel(self, example: torch.Tensor) -> int | None:
        if self.chunk_numel == "auto":
            return CPU_WAVE_NUMEL if example.device.type == "cpu" else None
        return self.chunk_numel

    def state_by_name(self) -> dict[str, dict]:
        """{parameter name: {"step", "exp_avg", "exp_avg_sq"}} for parameters that have state.

        Needs groups with `names` (as `param_groups` makes them). Keyed by name rather than torch's positional ids,
        so a checkpoint says which moment belongs to which weight.
        """
        states = {}
        for group in self.param_groups:
            if "names" not in group:
                raise ConfigError("state_by_name needs param groups with 'names' (see optim.param_groups)")
            for name, p in zip(group["names"], group["params"]):
                if self.state.get(p):
                    states[name] = dict(self.state[p])
        return states

    def load_state_by_name(self, states: dict[str, dict]) -> None:
        """Restore what `state_by_name` returned, into this optimizer's parameters of the same names and shapes."""
        known = {name: p for group in self.param_groups for name, p in zip(group["names"], group["params"])}
        unknown = sorted(set(states) - set(known))
        if unknown:
            raise CheckpointError(f"optimizer state for unknown parameters {', '.join(unknown[:3])}: the checkpoint "
                              "belongs to a different model")
        for name, saved in states.items():
            p = known[name]
            if saved["exp_avg"].shape != p.shape:
                raise CheckpointError(f"optimizer state of {name} has shape {tuple(saved['exp_avg'].shape)}, the "
                                  f"parameter {tuple(p.shape)}: the checkpoint belongs to a different model")
            self.state[p] = {"step": int(saved["step"]),
                             "exp_avg": saved["exp_avg"].to(device=p.device, dtype=p.dtype, copy=True),
                             "exp_avg_sq": saved["exp_avg_sq"].to(device=p.device, dtype=p.dtype, copy=True)}


@dataclass(frozen=True)
class _Hyper:
    """The scalars of one update: weight-decay factor, betas, gradient scale, eps and step size (bias-corrected)."""

    decay: float
    beta1: float
    beta2: float
    scale: float
    eps: float
    step_size: float


def _apply(h: _Hyper, ps: list[torch.Tensor], gs: list[torch.Tensor], ms: list[torch.Tensor],
           vs: list[torch.Tensor]) -> None:
    """The AdamW update of the module docstring on lists of tensors (pieces of parameters, or whole ones)."""
    if h.decay != 1.0:
        torch._foreach_mul_(ps, h.decay)
    if h.scale == 1.0:
        torch._foreach_lerp_(ms, gs, 1 - h.beta1)
    else:  # m <- beta1 m + (1 - beta1) (scale g): the scaled gradient is never written out
        torch._foreach_mul_(ms, h.beta1)
        torch._foreach_add_(ms, gs, alpha=(1 - h.beta1) * h.scale)
    torch._foreach_mul_(vs, h.beta2)
    torch._foreach_addcmul_(vs, gs, gs, (1 - h.beta2) * h.scale * h.scale)
    denom = torch._foreach_sqrt(vs)
    torch._foreach_add_(denom, h.eps)
    torch._foreach_addcdiv_(ps, ms, denom, -h.step_size)


def _one_pass(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, h: torch.Tensor) -> None:
    """The AdamW update of one parameter as plain arithmetic, for torch.compile to fuse into one loop.

    h holds the `_Hyper` scalars in field order, as a tensor on the parameter's device.
    """
    decay, beta1, beta2, scale, eps, step_size = h.unbind()
    g = g * scale
    m.copy_(beta1 * m + (1 - beta1) * g)
    v.copy_(beta2 * v + (1 - beta2) * g * g)
    p.copy_(decay * p - step_size * m / (v.sqrt() + eps))


@functools.cache
def _compiled_one_pass() -> Callable[..., None]:
    return torch.compile(_one_pass, dynamic=True, fullgraph=True)


def _one_pass_each(h: _Hyper, arrays: list[tuple[torch.Tensor, ...]]) -> None:
    """`_one_pass`, compiled, on each (p, g, m, v); ConfigError if torch.compile cannot build it here."""
    device = arrays[0][0].device
    scalars = torch.tensor([h.decay, h.beta1, h.beta2, h.scale, h.eps, h.step_size], dtype=torch.float32)
    if device.type == "cuda":  # copied from pinned memory, the transfer does not wait for the GPU's queue
        scalars = scalars.pin_memory()
    scalars = scalars.to(device, non_blocking=True)
    update = _compiled_one_pass()
    try:
        for p, g, m, v in arrays:
            update(p.detach(), g, m, v, scalars)  # detached: torch.compile takes an nn.Parameter's shape as fixed
    except torch._dynamo.exc.TorchDynamoException as exc:  # e.g. no C++ compiler on a CPU, no Triton on a GPU
        raise ConfigError(f"AdamW(compiled=True): torch.compile could not build the update ({first_line(exc)}); "
                          "use compiled=False (train.py: leave out --compile_optimizer)") from exc


@torch.no_grad()  # grad mode is per thread: a worker thread starts with it on
def _run(waves: list[list[tuple[torch.Tensor, ...]]], h: _Hyper) -> None:
    """One worker's share: its waves, one after the other."""
    for wave in waves:
        _apply(h, *(list(column) for column in zip(*wave)))


def _flattenable(group: tuple[torch.Tensor, ...]) -> bool:
    """Whether parameter, gradient and moments share one dense memory layout, so they can be cut alike."""
    return all(t.stride() == group[0].stride() for t in group) and _flat(group[0]) is not None


def _flat(t: torch.Tensor) -> torch.Tensor | None:
    """A 1-D view of `t` in memory order (dimensions sorted by stride), or None if `t` is not dense."""
    in_memory_order = t.permute(sorted(range(t.dim()), key=lambda d: -t.stride(d)))
    return in_memory_order.view(-1) if in_memory_order.is_contiguous() else None


def _waves(arrays: list[tuple[torch.Tensor, ...]], wave_numel: int) -> Iterator[list[tuple[torch.Tensor, ...]]]:
    """Waves of about `wave_numel` elements: lists of (p, g, m, v) pieces of at most PIECE_NUMEL elements each.

    A tensor larger than a piece is cut into several; small tensors are packed together into one wave. Pieces are
    views, so updating them in place updates the parameters and the optimizer state.
    """
    piece_numel = min(wave_numel, PIECE_NUMEL)
    wave: list[tuple[torch.Tensor, ...]] = []
    filled = 0
    for group in arrays:
        flats = [_flat(t) for t in group]
        numel = flats[0].numel()
        start = 0
        while start < numel:
            take = min(piece_numel, numel - start, wave_numel - filled)
            wave.append(tuple(flat[start:start + take] for flat in flats))
            start += take
            filled += take
            if filled == wave_numel:
                yield wave
                wave, filled = [], 0
    if wave:
        yield wave


def grad_norm(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all gradients together, as one fp32 tensor (inf or nan if any gradient is)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = torch._foreach_norm(grads)
    return torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))


def clip_factor(total_norm: float, max_norm: float) -> float:
    """The factor that scales gradients of norm `total_norm` down to at most `max_norm` (1.0 if already smaller).

    The same formula as torch.nn.utils.clip_grad_norm_, including its 1e-6 guard against division by zero.
    """
    return min(1.0, max_norm / (total_norm + 1e-6))
