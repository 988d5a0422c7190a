"""The hand-written GPT-2 against transformers' GPT2LMHeadModel on the same (random) weights."""

from __future__ import annotations

import math
import re

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from minigpt2 import GPT, ConfigError, GPTConfig
from minigpt2.kv_cache import KVCache
from minigpt2.loss import lm_loss
from minigpt2.model import ALIGNED_HEAD_MIN_ROWS, aligned_linear, dropout, naive_attention


def max_rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def load_pair(path, **overrides):
    ours = GPT.from_pretrained(path, **overrides)
    ref = GPT2LMHeadModel.from_pretrained(path).eval()
    return ours, ref


# Every official size's real width and head count; the 124M shape at full depth and context, the larger ones with
# fewer layers (and a smaller vocabulary) so the suite stays fast. Depth and vocabulary do not change the code path.
SHAPES = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024, initializer_range=0.02),
    "gpt2-medium": dict(n_layer=3, n_head=16, n_embd=1024, vocab_size=4096, initializer_range=0.02),
    "gpt2-large": dict(n_layer=2, n_head=20, n_embd=1280, vocab_size=4096, initializer_range=0.02),
    "gpt2-xl": dict(n_layer=2, n_head=25, n_embd=1600, vocab_size=4096, initializer_range=0.02),
    # Large weights: pre-activations reach the range where tanh-GELU and erf-GELU differ, so a wrong one shows.
    "large-weights": dict(n_layer=4, n_head=4, n_embd=128, initializer_range=0.2),
    # An unusual epsilon must be read from config.json, not assumed.
    "layernorm-eps": dict(n_layer=2, n_head=4, n_embd=64, layer_norm_epsilon=0.5, initializer_range=0.2),
}


# The naive attention is checked on the shapes that load fastest; sdpa on all of them.
CASES = [(shape, "sdpa") for shape in SHAPES] + [(shape, "naive") for shape in ("gpt2", "large-weights", "layernorm-eps")]


@pytest.mark.parametrize(("shape", "attn_impl"), CASES)
def test_logits_match_transformers(hf_checkpoint, shape, attn_impl):
    fields = SHAPES[shape]
    ours, ref = load_pair(hf_checkpoint(**fields), attn_impl=attn_impl)
    preset = shape if shape.startswith("gpt2") else None
    if preset:
        expected = GPTConfig.from_preset(preset)
        assert (ours.config.n_embd, ours.config.n_head) == (expected.n_embd, expected.n_head)
    torch.manual_seed(1)
    T = 1024 if shape == "gpt2" else 96
    input_ids = torch.randint(0, ours.config.vocab_size, (2, T))
    with torch.no_grad():
        logits = ours(input_ids)
        expected_logits = ref(input_ids).logits
    assert logits.shape == (2, T, ours.config.vocab_size)
    assert max_rel_err(logits, expected_logits) <= 1e-5


def test_left_padding_matches_unpadded(hf_checkpoint):
    ours, ref = load_pair(hf_checkpoint())
    torch.manual_seed(2)
    prompt = torch.randint(0, 50257, (1, 20))
    padded = torch.cat([torch.full((1, 7), 50256), prompt], dim=1)
    mask = torch.cat([torch.zeros(1, 7, dtype=torch.long), torch.ones(1, 20, dtype=torch.long)], dim=1)
    with torch.no_grad():
        alone = ref(prompt).logits
        ours_padded = ours(padded, attention_mask=mask)[:, 7:]
    assert max_rel_err(ours_padded, alone) <= 1e-5
    assert torch.isfinite(ours(padded, attention_mask=mask)).all()


def test_loss_matches_transformers_with_ignore_index(hf_checkpoint):
    ours, ref = load_pair(hf_checkpoint())
    torch.manual_seed(3)
    input_ids = torch.randint(0, 50257, (3, 40))
    labels = input_ids.clone()
    labels[0, 30:] = -100
    labels[2, :5] = -100
    with torch.no_grad():
        expected = ref(input_ids, labels=labels).loss
        got = ours.loss(input_ids, labels)
        aligned = lm_loss(ours(input_ids)[:, :-1], labels[:, 1:])
    assert abs(got.item() - expected.item()) <= 1e-5 * expected.item()
    assert got.item() == aligned.item()


@pytest.mark.parametrize("attn_impl", ["sdpa", "naive"])
def test_kv_cache_equals_full_forward(hf_checkpoint, attn_impl):
    """A prompt, then a chunk of several tokens (masked against the cache), then single tokens (no mask at all)."""
    ours, ref = load_pair(hf_checkpoint(), attn_impl=attn_impl)
    torch.manual_seed(4)
    input_ids = torch.randint(0, 50257, (2, 30))
    with torch.no_grad():
        full = ref(input_ids).logits
        cache = KVCache(ours.config, batch_size=2, max_len=30)
        steps = [ours(input_ids[:, :12], kv_cache=cache), ours(input_ids[:, 12:15], kv_cache=cache)]
        for t in range(15, 30):
            steps.append(ours(input_ids[:, t:t + 1], kv_cache=cache))
    assert cache.length == 30
    assert max_rel_err(torch.cat(steps, dim=1), full) <= 1e-5


@pytest.mark.parametrize("attn_impl", ["sdpa", "naive"])
def test_gradients_flow_through_the_kv_cache_as_through_transformers_past_key_values(hf_checkpoint, attn_impl):
    """With autograd on, logits computed in three chunks through a KV cache back-propagate into the weights as
    transformers' do through past_key_values: later chunks' keys and values come from the earlier chunks' graph.
    Writing into the cache used to raise autograd's error about in-place writes into unbind's views."""
    path = hf_checkpoint()
    ours = GPT.from_pretrained(path, attn_impl=attn_impl)
    ref = GPT2LMHeadModel.from_pretrained(path).eval()
    torch.manual_seed(5)
    input_ids = torch.randint(0, 50257, (2, 20))
    chunks = [slice(0, 8), slice(8, 9), slice(9, 20)]
    cache = KVCache(ours.config, batch_size=2, max_len=20)
    logits = torch.cat([ours(input_ids[:, chunk], kv_cache=cache) for chunk in chunks], dim=1)
    past, expected = None, []
    for chunk in chunks:
        out = ref(input_ids[:, chunk], past_key_values=past, use_cache=True)
        past = out.past_key_values
        expected.append(out.logits)
    expected = torch.cat(expected, dim=1)
    assert max_rel_err(logits.detach(), expected.detach()) <= 1e-5
    # A loss that weighs each position differently, so that a gradient lost between chunks would show.
    weights = torch.linspace(0.5, 2.0, 20)[None, :, None]
    (logits.log_softmax(-1) * weights).sum().backward()
    (expected.log_softmax(-1) * weights).sum().backward()
    ref_params = dict(ref.named_parameters())
    for name, param in ours.named_parameters():
        theirs = ref_params[name].grad
        if isinstance(ref.get_submodule(name.rpartition(".")[0]), Conv1D) and name.endswith(".weight"):
            theirs = theirs.t()  # transformers' Conv1D stores (in, out); nn.Linear (out, in)
        assert max_rel_err(param.grad, theirs) <= 1e-5, name


def test_forward_with_an_attention_mask_compiles_as_one_graph(hf_checkpoint):
    """torch.compile(fullgraph=True) of a forward given an attention mask: the test for an all-ones mask was a
    data-dependent branch that dynamo refuses in one graph (transformers' GPT-2 compiles this call). The eager
    backend traces as inductor would, without compiling C++. Padded or not, the logits are the uncompiled ones."""
    ours, _ = load_pair(hf_checkpoint())
    input_ids = torch.randint(0, 50257, (2, 10), generator=torch.Generator().manual_seed(6))
    compiled = torch.compile(ours, fullgraph=True, backend="eager", dynamic=False)
    for mask in (torch.ones(2, 10, dtype=torch.long), (torch.arange(10) >= torch.tensor([[0], [4]])).long()):
        with torch.no_grad():
            torch.testing.assert_close(compiled(input_ids, attention_mask=mask), ours(input_ids, attention_mask=mask))


def test_context_overflow_is_a_clear_error(hf_checkpoint):
    ours, _ = load_pair(hf_checkpoint(n_positions=32))
    with pytest.raises(ValueError, match="longer than the model's context of 32"):
        ours(torch.zeros(1, 33, dtype=torch.long))


def test_head_is_tied_and_dropout_only_in_training():
    torch.manual_seed(5)
    model = GPT(GPTConfig.from_preset("tiny", vocab_size=300, n_positions=64))
    assert model.lm_head.weight is model.transformer.wte.weight
    x = torch.randint(0, 300, (2, 16))
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


@pytest.mark.parametrize("vocab", [100, 128])
def test_aligned_linear_equals_the_plain_product_and_its_gradients(vocab):
    torch.manual_seed(6)
    x = torch.randn(2, 5, 16, requires_grad=True)
    w = torch.randn(vocab, 16, requires_grad=True)
    x_ref, w_ref = (t.detach().clone().requires_grad_() for t in (x, w))
    out = aligned_linear(x, w)
    ref = x_ref @ w_ref.T
    assert out.shape == (2, 5, vocab)
    assert out.stride()[-2:] == (128, 1)  # rows a multiple of 64 apart: 100 -> 128, 128 unchanged
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(ref)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(w.grad, w_ref.grad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the aligned head runs on CUDA only")
def test_head_on_cuda_is_aligned_and_matches_transformers_with_gradients(hf_checkpoint):
    path = hf_checkpoint(initializer_range=0.02)
    ours = GPT.from_pretrained(path).cuda()
    ref = GPT2LMHeadModel.from_pretrained(path).cuda().eval()
    torch.manual_seed(7)
    input_ids = torch.randint(0, 50257, (2, ALIGNED_HEAD_MIN_ROWS // 2), device="cuda")
    logits = ours(input_ids)
    expected = ref(input_ids, labels=input_ids)
    assert logits.stride(-2) == 50304  # the aligned path was taken
    assert max_rel_err(logits.detach(), expected.logits.detach()) <= 1e-4
    lm_loss(logits[:, :-1], input_ids[:, 1:]).backward()
    expected.loss.backward()
    ours_grad, ref_grad = ours.transformer.wte.weight.grad, ref.transformer.wte.weight.grad
    assert max_rel_err(ours_grad, ref_grad) <= 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_keeps_each_element_with_probability_1_minus_p_and_scales_it(dtype):
    x = torch.ones(1_000_000, dtype=dtype, requires_grad=True)
    torch.manual_seed(0)
    y = dropout(x, 0.25, training=True)
    kept = y != 0
    assert y.dtype == dtype
    assert abs(kept.float().mean().item() - 0.75) < 3e-3  # ~7 standard deviations of the keep rate
    # Survivors are scaled by 1 / 0.75 rounded to the dtype, exactly (bf16's nearest value is 1.3359375).
    assert torch.equal(y[kept], torch.full((int(kept.sum()),), 1 / 0.75, dtype=dtype))
    y.sum().backward()
    assert torch.equal(x.grad != 0, kept)  # the gradient flows through exactly the kept elements, scaled alike
    torch.manual_seed(0)
    assert torch.equal(dropout(x.detach(), 0.25, training=True), y.detach())  # torch's seed makes it repeatable
    assert dropout(x, 0.25, training=False) is x and not dropout(x, 1.0, training=True).any()


def test_dropout_rounds_p_to_sixteen_bits_and_scales_by_the_rounded_keep_rate():
    """p = 0.1 drops 6554 of the 65536 values of 16 random bits; survivors are scaled so the mean stays exact."""
    x = torch.ones(2_000_003)  # an odd size: not a whole number of 64-bit draws
    torch.manual_seed(1)
    y = dropout(x, 0.1, training=True)
    kept = y != 0
    assert abs(kept.float().mean().item() - (1 - 6554 / 65536)) < 2e-3
    # Each 64-bit draw serves four neighbours: every one of the four 16-bit lanes must keep at the same rate.
    lanes = kept[:2_000_000].view(-1, 4).float().mean(0)
    assert (lanes - (1 - 6554 / 65536)).abs().max() < 2e-3
    assert torch.equal(y[kept], torch.full((int(kept.sum()),), 65536 / (65536 - 6554)))
    assert dropout(x, 1e-6, training=True) is x  # rounds to 0: nothing to drop
    assert not dropout(x, 1 - 1e-6, training=True).any()  # rounds to 1: everything dropped


def test_gradient_checkpointing_gives_the_same_gradients_with_dropout(saved_for_backward):
    """Recomputing a block in backward draws the same dropout masks (checkpoint restores the RNG state)."""
    torch.manual_seed(6)
    config = GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=100, n_positions=32)  # GPT-2's dropout of 0.1
    model = GPT(config).train()
    x = torch.randint(0, 100, (2, 16))
    torch.manual_seed(7)
    with saved_for_backward() as plain_saved:
        loss = model.loss(x)
    loss.backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.gradient_checkpointing = True
    torch.manual_seed(7)
    with saved_for_backward() as recomputed_saved:
        loss = model.loss(x)
    loss.backward()
    for a, b in zip(plain, (p.grad for p in model.parameters())):
        torch.testing.assert_close(a, b)
    assert recomputed_saved.bytes < plain_saved.bytes / 2  # the blocks really were recomputed, dropout and all


def test_gradient_checkpointing_gives_the_same_gradients_and_keeps_fewer_activations(saved_for_backward):
    """The same gradients, from a forward pass that keeps far fewer activations for backward (the blocks' are
    recomputed there): with the flag ignored, the kept bytes would be equal."""
    torch.manual_seed(6)
    config = GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=100, n_positions=32, embd_pdrop=0.0,
                       attn_pdrop=0.0, resid_pdrop=0.0)
    model = GPT(config).train()
    x = torch.randint(0, 100, (2, 16))
    with saved_for_backward() as plain_saved:
        loss = model.loss(x)
    loss.backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.gradient_checkpointing = True
    with saved_for_backward() as recomputed_saved:
        loss = model.loss(x)
    loss.backward()
    for a, b in zip(plain, (p.grad for p in model.parameters())):
        torch.testing.assert_close(a, b)
    assert recomputed_saved.bytes < plain_saved.bytes / 2, (recomputed_saved.bytes, plain_saved.bytes)


def test_presets_match_the_published_sizes():
    # Parameter counts published for GPT-2 (tied head counted once): 124M, 355M, 774M, 1558M.
    with torch.device("meta"):
        counts = {name: GPT(GPTConfig.from_preset(name)).num_parameters() for name in
                  ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}
    assert counts == {"gpt2": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-large": 774_030_080,
                      "gpt2-xl": 1_557_611_200}


@pytest.mark.parametrize(("fields", "message"), [
    (dict(n_head=0), r"n_head must be a positive integer, got 0"),  # was a ZeroDivisionError from n_embd % n_head
    (dict(n_layer=2.0), r"n_layer must be a positive integer, got 2\.0"),
    (dict(vocab_size=True), r"vocab_size must be a positive integer, got True"),
    (dict(n_inner=-5), r"n_inner must be a positive integer or None \(4 \* n_embd\), got -5"),
    (dict(initializer_range=float("inf")), r"initializer_range must be a finite number >= 0, got inf"),
    (dict(resid_pdrop=1.0), r"resid_pdrop must be a probability in \[0, 1\), got 1\.0"),
])
def test_config_refuses_values_of_the_wrong_type_or_range(fields, message):
    """Checked where the config is made, so that the model's constructor never meets them."""
    with pytest.raises(ConfigError, match=rf"^{message}$"):
        GPTConfig(**fields)


def test_auto_attention_picks_triton_for_16_bit_cuda_attention_only(monkeypatch):
    """"auto": triton on CUDA for fp16/bf16 q, k, v (fp32 spills in the kernel); sdpa otherwise; the dtype the
    model reports is autocast's when autocast is on."""
    from minigpt2 import model as model_module

    monkeypatch.setattr(model_module, "_triton_runs_on", lambda device: True)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    resolve = model_module.resolve_attn_impl
    assert resolve("auto", cuda, 64, torch.bfloat16) == resolve("auto", cuda, 64, torch.float16) == "triton"
    assert resolve("auto", cuda, 64, torch.float32) == "sdpa"
    assert resolve("auto", cpu, 64, torch.bfloat16) == "sdpa"
    assert resolve("auto", cuda, 80, torch.bfloat16) == "sdpa"
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=64, n_positions=16))
    assert model._attention_dtype(cpu) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model._attention_dtype(cpu) == torch.bfloat16
    assert model.to(torch.bfloat16)._attention_dtype(cpu) == torch.bfloat16


def test_naive_attention_drops_the_softmax_weights_and_scales_the_survivors():
    """In training, attention dropout zeroes softmax(q k^T / sqrt(hs) + causal mask) elementwise and scales the
    kept weights by 1 / (1 - p), before they multiply v (as transformers' GPT2Attention does), neither the scores
    nor the output. The oracle rebuilds the keep-mask as `dropout` documents it: 16 random bits per weight, cut
    from 64-bit draws of torch's generator, p rounded to 2^-16; everything else is plain torch."""
    torch.manual_seed(0)
    B, nh, T, hs, p = 2, 3, 8, 16, 0.3
    q, k, v = (torch.randn(B, nh, T, hs) for _ in range(3))
    torch.manual_seed(123)
    got = naive_attention(q, k, v, None, p)

    dropped = round(p * 2**16)  # 19661 of the 65536 values of 16 bits
    n = B * nh * T * T
    torch.manual_seed(123)
    draws = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-2**63, None)
    keep = draws.view(torch.int16)[:n].view(B, nh, T, T) >= dropped - 2**15
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    scores = (q @ k.transpose(-2, -1) / math.sqrt(hs)).masked_fill(~causal, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    expected = (weights * keep / (1 - dropped / 2**16)) @ v
    assert 0.6 < keep.float().mean() < 0.8 and keep.tril().sum() < causal.sum() * B * nh  # some weights dropped
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, weights @ v)  # and that changed the output


def test_attention_dropout_acts_in_training_only_and_alone_makes_training_differ():
    """With embedding and residual dropout at 0, a model's training-mode output differs from its eval-mode output
    only through attn_pdrop: at 0.5 they differ, at 0 (same weights) they are equal; in eval they agree with
    each other whatever attn_pdrop is."""
    x = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    outputs = {}
    for attn_pdrop in (0.5, 0.0):
        torch.manual_seed(0)
        config = GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=100, n_positions=32, embd_pdrop=0.0,
                           resid_pdrop=0.0, attn_pdrop=attn_pdrop)
        model = GPT(config)
        with torch.no_grad():
            outputs[attn_pdrop] = model.train()(x), model.eval()(x)
    train_dropped, eval_dropped = outputs[0.5]
    train_plain, eval_plain = outputs[0.0]
    assert torch.equal(eval_dropped, eval_plain)  # the same weights: attn_pdrop changes nothing in eval
    assert not torch.allclose(train_dropped, eval_dropped, atol=1e-3)
    assert torch.equal(train_plain, eval_plain)


def test_initialisation_from_scratch_matches_transformers_statistics():
    """A fresh GPT's parameters follow the distribution transformers' GPT2LMHeadModel initialises with (GPT-2's
    init): each weight matrix and embedding N(0, initializer_range), the two projections that write into the
    residual stream (attn.c_proj, mlp.c_proj) N(0, initializer_range / sqrt(2 n_layer)), biases 0, LayerNorms 1
    and 0. Compared per parameter by Hub name against transformers' own init (mean, std, and the share within one
    std, which tells a normal from a uniform of the same std), and against the hand-computed std. transformers
    stores Conv1D weights transposed: the same numbers, so these statistics compare directly."""
    shape = dict(n_layer=4, n_head=4, n_embd=256, vocab_size=5000, n_positions=256)
    torch.manual_seed(0)
    ours = dict(GPT(GPTConfig(**shape)).named_parameters())
    torch.manual_seed(1)
    ref = dict(GPT2LMHeadModel(GPT2Config(**shape, bos_token_id=0, eos_token_id=0)).named_parameters())
    assert sorted(ours) == sorted(ref)
    residual_std = 0.02 / math.sqrt(2 * shape["n_layer"])
    for name, theirs in ref.items():
        mine = ours[name].detach()
        theirs = theirs.detach()
        if name.endswith("bias"):
            assert torch.equal(mine, torch.zeros_like(mine)) and torch.equal(theirs, mine), name
        elif ".ln_" in name:
            assert torch.equal(mine, torch.ones_like(mine)) and torch.equal(theirs, mine), name
        else:
            n = mine.numel()
            expected_std = residual_std if name.endswith("c_proj.weight") else 0.02
            for std in (mine.std().item(), theirs.std().item()):
                assert abs(std / expected_std - 1) < 0.03, (name, std, expected_std)
            assert abs(mine.std().item() / theirs.std().item() - 1) < 0.03, name
            # Means: within 6 standard errors of each other (about 8e-5 for N(0, 0.02) over 256 x 256 values).
            assert abs(mine.mean().item() - theirs.mean().item()) < 6 * expected_std * math.sqrt(2 / n), name
            within = [((t - t.mean()).abs() < t.std()).float().mean().item() for t in (mine, theirs)]
            assert abs(within[0] - within[1]) < 0.01, (name, within)  # 0.683 for a normal, 0.577 for a uniform


def test_explicit_position_ids_match_transformers(hf_checkpoint):
    """position_ids given to forward are the positions used, per row: one row starting at 5, another at 40 and
    skipping, against GPT2LMHeadModel given the same position_ids. They must also change the logits, else the
    comparison would not tell explicit positions from the default 0 .. T-1."""
    ours, ref = load_pair(hf_checkpoint())
    torch.manual_seed(8)
    input_ids = torch.randint(0, 50257, (2, 12))
    position_ids = torch.stack([torch.arange(5, 17), torch.arange(40, 64, 2)])
    with torch.no_grad():
        logits = ours(input_ids, position_ids=position_ids)
        expected = ref(input_ids, position_ids=position_ids).logits
        default = ours(input_ids)
    assert max_rel_err(logits, expected) <= 1e-5
    assert max_rel_err(default, expected) > 1e-2


def test_kv_cache_with_gradient_checkpointing_in_training_equals_full_forward(hf_checkpoint):
    """A model in training mode with gradient checkpointing on (and every dropout 0, so training mode is
    deterministic) decodes through a KV cache to the logits of its own full forward and of transformers'.
    Checkpointing used to run each block without the cache: the cache's keys and values were never written, and
    every step after the prompt attended to uninitialised memory."""
    ours, ref = load_pair(hf_checkpoint(), embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
    ours.train()
    ours.gradient_checkpointing = True
    torch.manual_seed(4)
    input_ids = torch.randint(0, 50257, (2, 30))
    with torch.no_grad():
        expected = ref(input_ids).logits
    full = ours(input_ids).detach()  # with autograd on, so the blocks really are checkpointed
    with torch.no_grad():  # as generate() decodes
        cache = KVCache(ours.config, batch_size=2, max_len=30)
        steps = [ours(input_ids[:, :12], kv_cache=cache), ours(input_ids[:, 12:15], kv_cache=cache)]
        for t in range(15, 30):
            steps.append(ours(input_ids[:, t:t + 1], kv_cache=cache))
    assert cache.length == 30
    assert max_rel_err(full, expected) <= 1e-5
    assert max_rel_err(torch.cat(steps, dim=1), full) <= 1e-5


def test_attention_mask_of_the_wrong_length_is_refused_by_name(hf_checkpoint):
    """A mask must have a column for every cached and new token. One short of that (the new tokens only, after a
    cache, as a caller might think) used to fail deep in torch with "The size of tensor a (4) must match..."; a
    mask of one row still stands for every row, as the mask of a batch of equal prompts does in transformers."""
    ours, ref = load_pair(hf_checkpoint())
    torch.manual_seed(9)
    input_ids = torch.randint(0, 50257, (2, 5))
    one_row = torch.tensor([[0, 1, 1, 1, 1]])
    with torch.no_grad():
        # transformers' forward counts positions from 0 whatever the mask (its generate() derives them, as ours does)
        positions = (one_row.cumsum(1) - 1).clamp(min=0).expand(2, 5)
        expected = ref(input_ids, attention_mask=one_row.expand(2, 5), position_ids=positions).logits
        assert max_rel_err(ours(input_ids, attention_mask=one_row)[:, 1:], expected[:, 1:]) <= 1e-5
        for bad in (torch.ones(2, 4), torch.ones(2, 6), torch.ones(3, 5), torch.ones(2, 1, 5)):
            shape = re.escape(str(tuple(bad.shape)))
            with pytest.raises(ValueError, match=rf"^attention_mask has shape {shape}, and 2 rows of 5 tokens after 0 "
                                                 r"cached ones need \(2, 5\)"):
                ours(input_ids, attention_mask=bad)
        cache = KVCache(ours.config, batch_size=2, max_len=6)
        ours(input_ids, attention_mask=torch.ones(2, 5), kv_cache=cache)
        with pytest.raises(ValueError, match=r"2 rows of 1 tokens after 5 cached ones need \(2, 6\)"):
            ours(input_ids[:, :1], attention_mask=torch.ones(2, 1), kv_cache=cache)
