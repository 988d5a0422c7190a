"""The Triton flash attention (kernels/) against torch's SDPA and a naive attention written out here.

Without a CUDA GPU the kernels run in Triton's CPU interpreter, which must be chosen before `kernels` is imported.
The interpreter computes the matmuls in fp32 whatever the input dtype, so its fp16/bf16 results differ from fp32
only by the rounding of inputs and results; on a GPU fp16/bf16 inputs also round the probabilities (and dS) to
fp16/bf16 before the matmuls that read them. Hence the two sets of tolerances below.
"""

from __future__ import annotations

import importlib
import math
import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import kernels  # noqa: E402
from kernels import flash_attention  # noqa: E402
from minigpt2.model import resolve_attn_impl  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (atol, rtol) of a result computed from dtype inputs, against an fp32 reference computed from the same
# (rounded) inputs. fp32: summation order only. fp16 (11-bit mantissa) and bf16 (8-bit): the rounding of the
# output, and on a GPU of P and dS, to the input dtype; gradients sum T such terms, hence the looser bf16 bound.
# The GPU bounds allow for the rounding of P and dS. The interpreter does not round them (its tl.dot is fp32), so
# its bounds are tighter: 2-3.5x the largest error measured over this file's shapes, as max |ours - ref| /
# (1 + |ref|) over out, dq, dk, dv: fp32 2.9e-6 (dk, left padding), fp16 7.9e-4 (dv, T=100), bf16 1.37e-2
# (dq, B=2 H=3 T=17).
if DEVICE == "cuda":
    TOLERANCES = {
        torch.float32: (1e-4, 1e-4),
        torch.float16: (1e-2, 1e-2),
        torch.bfloat16: (5e-2, 5e-2),
    }
else:
    TOLERANCES = {
        torch.float32: (1e-5, 1e-5),
        torch.float16: (2.5e-3, 2.5e-3),
        torch.bfloat16: (3e-2, 3e-2),
    }


def visibility(T: int, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    """Bool (B or 1, 1, T, T): query i sees key j iff j <= i and (key j is real or j == i) -- the documented rule."""
    idx = torch.arange(T, device=DEVICE)
    mask = (idx[None, :] <= idx[:, None])[None, None]
    if key_padding_mask is not None:
        mask = mask & (key_padding_mask[:, None, None, :] | (idx[None, :] == idx[:, None]))
    return mask


def naive_attention(q, k, v, mask):
    """softmax(q k^T / sqrt(hs) + mask) v, in fp32."""
    q, k, v = q.float(), k.float(), v.float()
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ v


def sdpa_attention(q, k, v, mask):
    q, k, v = q.float(), k.float(), v.float()
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def kernel_launches(fn) -> dict[str, int]:
    """How many times calling fn() runs the kernel's forward and backward operators (profiler events of the custom
    ops), so that a test of attn_impl="triton" cannot pass on sdpa: the model falls back to sdpa with only a
    one-time warning where it finds the kernel unusable."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    names = [event.name for event in prof.events()]
    return {op: names.count(f"minigpt2::flash_attention_{op}") for op in ("forward", "backward")}


def random_qkv(B, H, T, hs, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, hs, generator=generator).to(DEVICE, dtype) for _ in range(3)]


def output_and_grads(attention, q, k, v, grad_out, **kwargs):
    """attention(q, k, v) and (dq, dk, dv) for the upstream gradient grad_out, all as fp32."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = attention(q, k, v, **kwargs)
    out.backward(grad_out.to(out.dtype))
    return [t.float() for t in (out, q.grad, k.grad, v.grad)]


def check_against_references(q, k, v, key_padding_mask=None, real_rows=None):
    """Compare output and dq, dk, dv with SDPA and the naive formula, both fp32 on the upcast inputs.

    real_rows: bool (B, T) of query rows whose output is compared (default all); the gradients are always
    compared in full, every row being defined by the masking rule.
    """
    B, H, T, _ = q.shape
    atol, rtol = TOLERANCES[q.dtype]
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    ours = output_and_grads(flash_attention, q, k, v, grad_out, key_padding_mask=key_padding_mask)
    assert all(t.isfinite().all() for t in ours)
    full_mask = visibility(T, key_padding_mask)
    sdpa_mask = None if key_padding_mask is None else full_mask
    references = {
        "sdpa": output_and_grads(lambda q, k, v: sdpa_attention(q, k, v, sdpa_mask), q.float(), k.float(),
                                 v.float(), grad_out),
        "naive": output_and_grads(lambda q, k, v: naive_attention(q, k, v, full_mask), q.float(), k.float(),
                                  v.float(), grad_out),
    }
    rows = (slice(None),) if real_rows is None else (real_rows[:, None, :].expand(B, H, T),)
    for name, (out, dq, dk, dv) in references.items():
        torch.testing.assert_close(ours[0][rows], out[rows], atol=atol, rtol=rtol, msg=lambda m: f"{name} out: {m}")
        for label, mine, theirs in zip(("dq", "dk", "dv"), ours[1:], (dq, dk, dv)):
            torch.testing.assert_close(mine, theirs, atol=atol, rtol=rtol, msg=lambda m: f"{name} {label}: {m}")
    return ours


def test_is_available():
    assert kernels.is_available()


@pytest.mark.parametrize("spelling", ["true", "on"])
def test_every_spelling_triton_interprets_runs_the_kernel_on_a_cpu(spelling):
    """The model asks kernels whether the interpreter is on, which asks Triton: with a spelling Triton reads as on,
    attn_impl="triton" used to warn that it needed TRITON_INTERPRET=1 and fall back to sdpa."""
    script = ("import torch, triton, kernels; from minigpt2.model import resolve_attn_impl; "
              "print(triton.knobs.runtime.interpret, resolve_attn_impl('triton', torch.device('cpu'), 16, "
              "torch.float32))")
    env = {**os.environ, "TRITON_INTERPRET": spelling, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert (done.returncode, done.stdout.split(), done.stderr) == (0, ["True", "triton"], "")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("B, H, T", [(1, 1, 1), (2, 3, 17), (1, 2, 100), (2, 1, 130)])
def test_causal_matches_references(B, H, T, dtype):
    check_against_references(*random_qkv(B, H, T, 64, dtype))


@pytest.mark.parametrize("hs", [16, 32, 128])
def test_head_sizes(hs):
    check_against_references(*random_qkv(2, 2, 70, hs, torch.float32))


def test_length_past_one_tile_row():
    """Several key tiles below the diagonal, so the unmasked loop runs more than once."""
    check_against_references(*random_qkv(1, 1, 300, 64, torch.float32))


def test_strided_inputs_like_the_model():
    """q, k, v as the model makes them: views of one (B, T, 3C) projection, transposed to (B, nh, T, hs)."""
    B, T, H, hs = 2, 50, 3, 64
    qkv = torch.randn(B, T, 3 * H * hs, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    q, k, v = (t.view(B, T, H, hs).transpose(1, 2) for t in qkv.split(H * hs, dim=2))
    assert not q.is_contiguous()
    check_against_references(q, k, v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("T, pads", [(17, [0, 3, 16]), (130, [0, 70, 130])])
def test_left_padding(T, pads, dtype):
    """Left-padded batches. With T=130 and pad 70, query rows 64..69 meet a whole key tile of padding before
    their own position; pad = T is a row of nothing but padding."""
    B, H = len(pads), 2
    key_padding_mask = torch.arange(T, device=DEVICE)[None, :] >= torch.tensor(pads, device=DEVICE)[:, None]
    q, k, v = random_qkv(B, H, T, 64, dtype)
    out = check_against_references(q, k, v, key_padding_mask, real_rows=key_padding_mask)[0]
    # A padding query sees only itself: its output is its own value vector, finite.
    pad_rows = ~key_padding_mask[:, None, :].expand(B, H, T)
    assert out[pad_rows].isfinite().all()
    torch.testing.assert_close(out[pad_rows], v.float()[pad_rows], atol=1e-6, rtol=0)


def test_a_batch_of_more_pairs_than_a_grid_takes_is_launched_in_slices(monkeypatch):
    """CUDA's grid holds at most 65,535 (batch, head) pairs on its axis 1 (a prefill of some 5,500 rows of 12 heads
    would not launch). With the limit lowered to 4 pairs, 3 rows of 2 heads go in two launches per kernel, and the
    output and gradients equal the references and, bit for bit, those of one launch."""
    module = importlib.import_module("kernels.flash_attention")
    B, H, T = 3, 2, 17
    key_padding_mask = torch.arange(T, device=DEVICE)[None, :] >= torch.tensor([0, 5, 2], device=DEVICE)[:, None]
    q, k, v = random_qkv(B, H, T, 16, torch.float32)
    whole = output_and_grads(flash_attention, q, k, v, torch.ones_like(q), key_padding_mask=key_padding_mask)
    monkeypatch.setattr(module, "MAX_GRID_PAIRS", 4)
    launches = {}

    class Counted:  # kernel[grid](...) as before, counting the grids' axis 1 sizes
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            pairs = (grid if isinstance(grid, tuple) else grid({"BLOCK_M": 64, "BLOCK_N": 64}))[1]
            launches.setdefault(self.name, []).append(pairs)
            return self.kernel[grid]

    for name in ("_fwd_kernel", "_bwd_delta_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel"):
        monkeypatch.setattr(module, name, Counted(name, getattr(module, name)))
    check_against_references(q, k, v, key_padding_mask, real_rows=key_padding_mask)
    assert launches == {name: [4, 2] for name in launches} and len(launches) == 4
    again = output_and_grads(flash_attention, q, k, v, torch.ones_like(q), key_padding_mask=key_padding_mask)
    assert all(torch.equal(a, b) for a, b in zip(whole, again))


def test_all_real_mask_equals_no_mask():
    q, k, v = random_qkv(2, 2, 33, 64, torch.float32)
    with torch.no_grad():
        plain = flash_attention(q, k, v)
        masked = flash_attention(q, k, v, key_padding_mask=torch.ones(2, 33, dtype=torch.bool, device=DEVICE))
    torch.testing.assert_close(plain, masked, atol=0, rtol=0)


def test_rejects_bad_inputs():
    q, k, v = random_qkv(1, 1, 8, 64, torch.float32)
    with pytest.raises(ValueError, match="head size"):
        flash_attention(*random_qkv(1, 1, 8, 48, torch.float32))
    with pytest.raises(ValueError, match="head size"):
        flash_attention(*random_qkv(1, 1, 8, 256, torch.float32))
    with pytest.raises(ValueError, match="shape|must all be"):
        flash_attention(q, k[:, :, :4], v)
    with pytest.raises(ValueError, match="dtype"):
        flash_attention(q, k.half(), v)
    with pytest.raises(ValueError, match="key_padding_mask"):
        flash_attention(q, k, v, key_padding_mask=torch.ones(1, 7, dtype=torch.bool, device=DEVICE))


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left_padded"])
def test_gpt_triton_matches_sdpa(padded):
    """A small GPT: logits and every parameter gradient agree between attn_impl="triton" and "sdpa"."""
    from minigpt2 import GPT, GPTConfig

    models = {}
    for impl in ("sdpa", "triton"):
        torch.manual_seed(0)
        config = GPTConfig(n_layer=2, n_head=4, n_embd=256, vocab_size=512, n_positions=128, attn_impl=impl)
        models[impl] = GPT(config).to(DEVICE).eval()  # eval: no dropout, so both see the same computation
    B, T = 2, 90
    input_ids = torch.randint(0, 512, (B, T), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    attention_mask = None
    if padded:
        attention_mask = (torch.arange(T)[None, :] >= torch.tensor([0, 37])[:, None]).long().to(DEVICE)
    # The model would run sdpa under the name "triton" if it found the kernel unusable here (a one-time warning).
    assert resolve_attn_impl("triton", torch.device(DEVICE), 256 // 4, torch.float32) == "triton"
    logits, grads, launches = {}, {}, {}

    def forward_backward(impl, model):
        out = model(input_ids, attention_mask=attention_mask)
        weights = attention_mask[:, :, None].float() if padded else 1.0  # the loss ignores padding positions
        (out.float().square() * weights).mean().backward()
        logits[impl] = out.detach()

    for impl, model in models.items():
        launches[impl] = kernel_launches(lambda: forward_backward(impl, model))
        grads[impl] = {name: p.grad for name, p in model.named_parameters()}
    assert launches == {"sdpa": {"forward": 0, "backward": 0}, "triton": {"forward": 2, "backward": 2}}  # a layer each
    real = slice(None) if not padded else attention_mask.bool()
    torch.testing.assert_close(logits["triton"][real], logits["sdpa"][real], atol=1e-4, rtol=1e-4)
    for name, grad in grads["sdpa"].items():
        torch.testing.assert_close(grads["triton"][name], grad, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_kernels_are_torch_operators_that_compile():
    """The launches are torch operators with shape-only (fake) versions: torch.library.opcheck validates their
    schemas and fake versions, and a compiled GPT with attn_impl="triton" matches the eager one with SDPA."""
    from minigpt2 import GPT, GPTConfig

    q, k, v = random_qkv(2, 2, 40, 32, torch.float32)
    pad = torch.ones(2, 40, dtype=torch.int8, device=DEVICE)
    tests = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.minigpt2.flash_attention_forward, (q, k, v, pad, 0.2), test_utils=tests)
    o, lse = torch.ops.minigpt2.flash_attention_forward(q, k, v, None, 0.2)
    torch.library.opcheck(torch.ops.minigpt2.flash_attention_backward, (torch.randn_like(o), q, k, v, o, lse, None,
                                                                       0.2), test_utils=tests)
    models = {}
    for impl in ("sdpa", "triton"):
        torch.manual_seed(0)
        config = GPTConfig(n_layer=1, n_head=2, n_embd=64, vocab_size=128, n_positions=64, attn_impl=impl,
                           embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
        models[impl] = GPT(config).to(DEVICE).train()
    input_ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    assert resolve_attn_impl("triton", torch.device(DEVICE), 64 // 2, torch.float32) == "triton"  # not sdpa
    compiled = torch.compile(models["triton"], fullgraph=True)  # fullgraph: no break at the kernel
    outputs = {"triton": compiled(input_ids), "sdpa": models["sdpa"](input_ids)}
    for out in outputs.values():
        out.square().mean().backward()
    torch.testing.assert_close(outputs["triton"], outputs["sdpa"], atol=1e-4, rtol=1e-4)
    for (name, p), ref in zip(models["triton"].named_parameters(), models["sdpa"].parameters()):
        torch.testing.assert_close(p.grad, ref.grad, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    # The compiled graph runs the kernel: counted on a second call (the graph is reused, no recompilation), as the
    # first one's compilation also calls the operators, on fake tensors.
    launches = kernel_launches(lambda: compiled(input_ids).square().mean().backward())
    assert launches == {"forward": 1, "backward": 1}


def test_gpt_triton_takes_a_one_row_attention_mask_for_the_batch():
    """The model accepts an attention_mask of one row for a batch of several (the other paths broadcast it); the
    kernel was handed that (1, T) row as its key-padding mask and refused it as not (B, T)."""
    from minigpt2 import GPT, GPTConfig

    models = {}
    for impl in ("sdpa", "triton"):
        torch.manual_seed(0)
        config = GPTConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=64, n_positions=16, attn_impl=impl)
        models[impl] = GPT(config).to(DEVICE).eval()
    input_ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    attention_mask = (torch.arange(10) >= 3).long()[None, :].to(DEVICE)  # (1, T): both rows padded by 3
    logits = {}
    launches = kernel_launches(lambda: logits.update(triton=models["triton"](input_ids, attention_mask=attention_mask)))
    assert launches["forward"] == 1
    logits["sdpa"] = models["sdpa"](input_ids, attention_mask=attention_mask)
    real = attention_mask.bool().expand(2, 10)
    torch.testing.assert_close(logits["triton"][real], logits["sdpa"][real], atol=1e-4, rtol=1e-4)


def test_gpt_triton_in_float64_warns_and_uses_sdpa():
    """The kernel takes fp16, bf16 and fp32 only. An explicit attn_impl="triton" in a float64 model passed
    resolve_attn_impl (which checked the head size but not the dtype) and the kernel then raised a ValueError in
    the middle of generate; the model promises a warning and sdpa instead."""
    from minigpt2 import GPT, GPTConfig

    models = {}
    for impl in ("sdpa", "triton"):
        torch.manual_seed(0)
        config = GPTConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=64, n_positions=16, attn_impl=impl,
                           initializer_range=0.2)
        models[impl] = GPT(config).to(DEVICE, torch.float64).eval()
    input_ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    attention_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], device=DEVICE)
    outputs = {}
    with pytest.warns(UserWarning, match="not torch.float64; using sdpa"):
        for impl, model in models.items():
            outputs[impl] = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=4,
                                           do_sample=False)
    torch.testing.assert_close(outputs["triton"], outputs["sdpa"], atol=0, rtol=0)


@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"), reason="torch without fp32_precision")
@pytest.mark.parametrize("precision", ["tf32", "ieee"])
def test_fp32_inputs_follow_torchs_fp32_precision_setting(precision):
    """fp32 inputs use TF32 matmuls when torch allows them for its own. The kernel read the older allow_tf32 flag,
    and after TF32 is set through torch's newer fp32_precision, torch raises a RuntimeError on that read: every
    fp32 call of the kernel failed."""
    launch_options = sys.modules["kernels.flash_attention"]._launch_options
    q, k, v = random_qkv(1, 2, 20, 32, torch.float32)
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = precision
    try:
        assert launch_options(q, 20)["INPUT_PRECISION"] == precision
        with torch.no_grad():
            out = flash_attention(q, k, v)
    finally:
        matmul.fp32_precision = before
    atol, rtol = (1e-2, 1e-2) if precision == "tf32" and DEVICE == "cuda" else TOLERANCES[torch.float32]
    torch.testing.assert_close(out, naive_attention(q, k, v, visibility(20, None)), atol=atol, rtol=rtol)


def test_a_triton_without_knobs_is_unavailable_and_the_model_falls_back():
    """The kernels read Triton's own knob for TRITON_INTERPRET, triton.knobs, which triton 3.0-3.3 (allowed by the
    old `triton>=3.0`) lack: `import kernels` raised an AttributeError, which the model's availability check (made
    for a missing triton, an ImportError) let through, so attn_impl="triton" died in the forward instead of
    warning and using sdpa. Simulated by removing the attribute from this triton."""
    script = ("import torch, triton; del triton.knobs; from minigpt2.model import resolve_attn_impl; "
              "print(resolve_attn_impl('triton', torch.device('cpu'), 16, torch.float32)); "
              "import kernels; print(kernels.is_available())")
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert (done.returncode, done.stdout.split()) == (0, ["sdpa", "False"]), done.stderr
    assert "needs triton 3.4 or newer" in done.stderr
