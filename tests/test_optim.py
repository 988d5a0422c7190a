"""AdamW against torch.optim.AdamW, parameter groups against transformers' Trainer, and the lr schedules."""

from __future__ import annotations

import math

import pytest
import torch

from minigpt2 import GPT, GPTConfig, optim
from minigpt2.errors import ConfigError
from minigpt2.loss import lm_loss
from minigpt2.optim import AdamW, clip_factor, grad_norm, param_groups
from minigpt2.schedule import LRSchedule

SMALL = dict(n_layer=2, n_head=4, n_embd=64, vocab_size=512, n_positions=64, embd_pdrop=0.0, attn_pdrop=0.0,
             resid_pdrop=0.0)


pytestmark = pytest.mark.usefixtures("one_thread")


def small_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**SMALL))


def twin_optimizers(chunk_numel, weight_decay=0.1, betas=(0.9, 0.95), compiled=False):
    """Two identical models, ours with our AdamW and the other with torch's, on the same param groups."""
    ours_model, torch_model = small_model(), small_model()
    ours = AdamW(param_groups(ours_model, weight_decay), lr=2e-3, betas=betas, eps=1e-8, chunk_numel=chunk_numel,
                 compiled=compiled)
    reference = torch.optim.AdamW(param_groups(torch_model, weight_decay), lr=2e-3, betas=betas, eps=1e-8)
    return ours_model, ours, torch_model, reference


def set_same_grads(ours_model: GPT, torch_model: GPT, step: int) -> None:
    """Real gradients (forward/backward of ours on random tokens), copied to the twin: only the optimizers differ."""
    g = torch.Generator().manual_seed(step)
    x = torch.randint(0, SMALL["vocab_size"], (4, 33), generator=g)
    ours_model.zero_grad(set_to_none=True)
    (lm_loss(ours_model(x[:, :-1]), x[:, 1:]) * (1 + step % 5)).backward()  # varying gradient scales
    for p, q in zip(ours_model.parameters(), torch_model.parameters()):
        q.grad = p.grad.clone()


def max_difference(a: GPT, b: GPT) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("chunk_numel, compiled", [("auto", False), (None, False), (1000, False), ("auto", True)])
def test_adamw_follows_torch_adamw_over_many_steps(chunk_numel, compiled):
    ours_model, ours, torch_model, reference = twin_optimizers(chunk_numel, compiled=compiled)
    for step in range(150):
        lr = 2e-3 * (0.5 + 0.5 * math.cos(step / 40))  # a changing rate, as under a schedule
        for group in ours.param_groups + reference.param_groups:
            group["lr"] = lr
        set_same_grads(ours_model, torch_model, step)
        ours.step()
        reference.step()
        assert max_difference(ours_model, torch_model) < 1e-6, f"step {step}"
    moved = max((p - q).abs().max().item() for p, q in zip(ours_model.parameters(), small_model().parameters()))
    assert moved > 0.05  # the weights did travel: the comparison is not vacuous


def test_result_is_independent_of_threads_and_memory_layout():
    """Waves, worker threads and non-contiguous (input-major) weights change the schedule of the work, not a bit of
    the result."""
    models, optimizers = [], []
    for threads, chunk_numel, input_major in ((1, "auto", False), (3, 5000, False), (2, 5000, True)):
        model = small_model()
        if input_major:
            for module in model.modules():
                if isinstance(module, torch.nn.Linear) and module.weight is not model.lm_head.weight:
                    module.weight.data = module.weight.data.t().contiguous().t()
        models.append(model)
        optimizers.append(AdamW(param_groups(model, 0.1), lr=2e-3, chunk_numel=chunk_numel, threads=threads))
    for step in range(5):
        set_same_grads(models[0], models[1], step)
        for model, optimizer in zip(models, optimizers):
            for p, q in zip(models[0].parameters(), model.parameters()):
                q.grad = torch.empty_like(q).copy_(p.grad)  # same values, in q's memory layout
            optimizer.step(grad_scale=0.7)
    for other in models[1:]:
        assert all(torch.equal(p, q) for p, q in zip(models[0].parameters(), other.parameters()))
    assert not models[2].transformer.h[0].mlp.c_fc.weight.is_contiguous()


def test_worker_threads_are_started_once(monkeypatch):
    """The two parameter groups need different numbers of workers: a pool per change meant two new pools (and their
    threads, never shut down) every step."""
    pools = []
    real_pool = optim.ThreadPoolExecutor
    monkeypatch.setattr(optim, "ThreadPoolExecutor", lambda **kwargs: pools.append(kwargs) or real_pool(**kwargs))
    model = small_model()
    optimizer = AdamW(param_groups(model, 0.1), lr=2e-3, chunk_numel=600, threads=4)  # no-decay group: 3 waves
    for step in range(5):
        set_same_grads(model, small_model(), step)
        optimizer.step()
    assert [kwargs["max_workers"] for kwargs in pools] == [4]


@pytest.mark.parametrize("compiled", [False, True])
def test_fused_clipping_equals_clip_grad_norm_then_adamw(compiled):
    ours_model, ours, torch_model, reference = twin_optimizers("auto", compiled=compiled)
    clipped = 0
    for step in range(60):
        set_same_grads(ours_model, torch_model, step)
        factor = clip_factor(grad_norm(ours_model.parameters()).item(), max_norm=0.5)
        clipped += factor < 1
        ours.step(grad_scale=factor)
        torch.nn.utils.clip_grad_norm_(torch_model.parameters(), 0.5)
        reference.step()
        assert max_difference(ours_model, torch_model) < 1e-6, f"step {step}"
    assert clipped > 30


def test_compiled_update_compiles_once_per_tensor_rank():
    """Dynamic shapes: the one-pass update is built once for matrices and once for vectors, not once per parameter
    shape, and a new learning rate or step count (scalars passed as a tensor) compiles nothing new."""
    from torch._dynamo.utils import counters

    from minigpt2.optim import _compiled_one_pass

    torch._dynamo.reset()
    _compiled_one_pass.cache_clear()
    counters.clear()
    model, optimizer, *_ = twin_optimizers("auto", compiled=True)
    shapes = {tuple(p.shape) for p in model.parameters()}
    assert len(shapes) > 4 and {len(shape) for shape in shapes} == {1, 2}
    for step in range(3):
        set_same_grads(model, small_model(), step)
        optimizer.param_groups[0]["lr"] = 1e-3 * (step + 1)
        optimizer.step(grad_scale=0.5 + step)
    assert counters["stats"]["unique_graphs"] == 2
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_compiled_update_without_a_compiler_is_a_config_error():
    """With no C++ compiler, the first compiled step raises ConfigError saying how to go on, and changes no
    weight."""
    import torch._inductor.config as inductor_config

    from minigpt2.optim import _compiled_one_pass

    torch._dynamo.reset()
    _compiled_one_pass.cache_clear()
    model, optimizer, *_ = twin_optimizers("auto", compiled=True)
    set_same_grads(model, small_model(), 0)
    no_compiler = {"cpp.cxx": ("no-such-c++-compiler",), "fx_graph_cache": False}  # a cached build needs none
    expected = r"compiled=True.*no-such-c\+\+-compiler.*compiled=False \(train.py: leave out --compile_optimizer\)"
    try:
        with inductor_config.patch(no_compiler), pytest.raises(ConfigError, match=expected):
            optimizer.step()
        assert max_difference(model, small_model()) == 0
    finally:
        torch._dynamo.reset()
        _compiled_one_pass.cache_clear()


def test_grad_norm_and_clip_factor_match_torch():
    model = small_model()
    set_same_grads(model, small_model(1), 3)
    expected = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
    assert grad_norm(model.parameters()).item() == pytest.approx(expected.item(), rel=1e-6)
    assert clip_factor(10.0, 1.0) == pytest.approx(1.0 / (10.0 + 1e-6))
    assert clip_factor(0.5, 1.0) == 1.0


def test_param_groups_decay_like_transformers_trainer():
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer

    model = small_model()
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=512, n_positions=64))
    hf_decay = set(Trainer.get_decay_parameter_names(None, hf)) - {"lm_head.weight"}  # tied to wte
    assert set(decay["names"]) == hf_decay
    assert set(no_decay["names"]) == {name for name, _ in hf.named_parameters()} - hf_decay
    # Every parameter exactly once: the tied head is not a second copy of wte.
    assert sorted(decay["names"] + no_decay["names"]) == sorted(name for name, _ in model.named_parameters())
    assert "transformer.wte.weight" in decay["names"] and "transformer.ln_f.weight" in no_decay["names"]


def test_state_by_name_round_trip():
    """State saved after 3 steps and loaded into a fresh optimizer continues exactly as torch's AdamW that never
    stopped: the moments and step counts (bias corrections) reach the right parameters."""
    ours_model, ours, torch_model, reference = twin_optimizers("auto")
    for step in range(3):
        set_same_grads(ours_model, torch_model, step)
        ours.step()
        reference.step()
    saved = ours.state_by_name()
    assert set(saved) == {name for name, _ in ours_model.named_parameters()}
    assert saved["transformer.wte.weight"]["step"] == 3
    resumed_model = small_model()
    resumed_model.load_state_dict(ours_model.state_dict())
    resumed = AdamW(param_groups(resumed_model, 0.1), lr=2e-3, betas=(0.9, 0.95))
    resumed.load_state_by_name(saved)
    for step in range(3, 8):
        set_same_grads(resumed_model, torch_model, step)
        resumed.step()
        reference.step()
        assert max_difference(resumed_model, torch_model) < 1e-6, f"step {step}"


def test_adamw_rejects_bad_settings():
    params = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(ConfigError):
        AdamW(params, lr=-1.0)
    with pytest.raises(ConfigError):
        AdamW(params, betas=(0.9, 1.0))
    with pytest.raises(ConfigError):
        AdamW(params, chunk_numel=0)


def test_cosine_schedule_values():
    s = LRSchedule(peak=1e-3, max_steps=110, warmup_steps=10, kind="cosine", min_lr=1e-4)
    assert s(0) == pytest.approx(1e-4)  # (0 + 1) / 10 of the peak: the first update already moves
    assert s(4) == pytest.approx(5e-4)
    assert s(9) == pytest.approx(1e-3)
    assert s(10) == pytest.approx(1e-3)  # decay starts from the peak
    assert s(60) == pytest.approx(1e-4 + 0.9e-3 * 0.5)  # halfway: cos(pi / 2) = 0
    assert s(35) == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert s(110) == pytest.approx(1e-4) and s(500) == pytest.approx(1e-4)


def test_linear_and_constant_schedules():
    linear = LRSchedule(peak=2.0, max_steps=12, warmup_steps=2, kind="linear", min_lr=0.0)
    assert [linear(i) for i in range(13)] == pytest.approx([1.0, 2.0, 2.0, 1.8, 1.6, 1.4, 1.2, 1.0, 0.8, 0.6, 0.4,
                                                             0.2, 0.0])
    constant = LRSchedule(peak=3e-4, max_steps=5, warmup_steps=3, kind="constant")
    assert [constant(i) for i in range(6)] == pytest.approx([1e-4, 2e-4, 3e-4, 3e-4, 3e-4, 3e-4])
    no_warmup = LRSchedule(peak=1.0, max_steps=4, kind="cosine")
    assert no_warmup(0) == 1.0 and no_warmup(2) == pytest.approx(0.5)


def test_schedule_rejects_bad_settings():
    with pytest.raises(ConfigError):
        LRSchedule(peak=1e-3, max_steps=10, kind="exponential")
    with pytest.raises(ConfigError):
        LRSchedule(peak=1e-3, max_steps=10, min_lr=1e-2)
    with pytest.raises(ConfigError):
        LRSchedule(peak=1e-3, max_steps=0)
