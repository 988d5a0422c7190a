"""One decoding step without modules: the model's forward for a single new token per row, as generate() runs it.

model.py is the reference: it is the forward to read, for training, prompts and every other shape. This file spells
out the same operations for the one call that generate() makes over and over, a single new token per row after a
KV cache, with everything that does not change from step to step looked up once instead of at every step.

Why a CPU needs it: a decoding step reads every weight once (498 MB for gpt2 in fp32), so its floor is the time of
the 49 matrix-vector products (about 20 ms on the 2-core CI machine). Each product streams megabytes through the
caches and evicts the code and data of whatever runs next, so every operation between two products runs cold: a
LayerNorm of 768 values costs 17 us there against 3.5 us in a loop, SDPA for one query 39 us against 16 us, and even
a view costs 10 us. The module forward puts about 30 such operations between consecutive products (module calls,
F.linear's transpose of the weight, splits and transposes of q/k/v, mask and position bookkeeping): measured, its
step is 21-25% above the floor. This step keeps only the arithmetic, 11 operations a block (4 of them the products),
and does the rest in bulk before the first product: the views of every layer's cache, and the biases, copied in one
go into the buffer where the products then land (packed products, for several rows, make their own output instead).
It is 4-8% above the floor.

The operations are model.py's, in its order, so the logits are the same to the bit on a CPU (the tests check it
against the module forward, and generate() against transformers). Per step:

    x = wte[token] + wpe[position]                                      (rows, C)
    per block:  q, k, v = c_attn(ln_1(x))      -> k, v written into the cache at `position`
                x = x + c_proj(attention(q, cached keys, cached values))
                x = x + mlp.c_proj(gelu(c_fc(ln_2(x))))
    logits = ln_f(x) @ wte^T                                            (rows, vocab)

A projection whose weights generate() packed for several rows (prepack.py) multiplies through its packed copy.
generate() uses the module forward instead where this step would not do the same: a module in training mode
(dropout), attn_impl="naive", a replaced sub-module or forward, forward hooks (this step calls no module, so no
hook would fire), or autocast.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .kv_cache import KVCache
from .model import GPT, MLP, Block, CausalSelfAttention, Dropout, attention_masks

Fn = Callable[[torch.Tensor], torch.Tensor]
Step = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]  # (tokens (rows,), attention mask) -> logits


def decoding_step(model: nn.Module, cache: KVCache) -> Step:
    """The step generate() runs over `cache`: `DecodeStep` where it computes what the model's forward would
    (`supports`), else the forward itself, fed one token per row."""
    if supports(model):
        return DecodeStep(model, cache)
    # tokens (rows,) -> (rows, 1); logits (rows, 1, V) -> (rows, V)
    return lambda tokens, mask: model(tokens[:, None], attention_mask=mask, kv_cache=cache)[:, -1]


def supports(model: nn.Module) -> bool:
    """Whether this step computes exactly what `model`'s own forward would for one new token.

    Only for the stock GPT with every module in eval mode and SDPA attention (the kernel of a cached step for "auto",
    "sdpa" and "triton" alike), built of model.py's own classes with their own forward, with no forward hooks and no
    forward (or head, hidden_states) replaced on an instance, except a projection's: that one is called, see
    `_projection`. Not under autocast, whose products this step would not cast.
    """
    if type(model) is not GPT or model.config.attn_impl == "naive" or model.lm_head.bias is not None:
        return False
    if torch.is_autocast_enabled(model.lm_head.weight.device.type):  # products in another dtype than the weights
        return False
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return False
    if any(name in vars(model) for name in ("head", "hidden_states")):
        return False
    for module in model.modules():
        kind = type(module)
        if kind not in _STOCK or kind.forward is not _STOCK[kind] or module.training:  # training: dropout
            return False
        if module._forward_hooks or module._forward_pre_hooks or ("forward" in vars(module) and kind is not nn.Linear):
            return False
    return True


# model.py's classes and their own forward (a forward patched on the class afterwards is not the one this mirrors).
_STOCK = {kind: kind.forward for kind in (GPT, nn.ModuleDict, nn.ModuleList, nn.Embedding, Dropout, Block,
                                          nn.LayerNorm, CausalSelfAttention, MLP, nn.Linear)}


class DecodeStep:
    """`step(tokens, attention_mask)`: next-token logits (rows, vocab) for one new token per row, into `cache`.

    Built once per generate() call, after the prompt filled `cache` (and after generate() chose how the weights are
    held). It keeps views of the weights (or their packed copies) and a copy of the biases taken here: the
    parameters must not change while it is in use. The cache is read afresh at every call, so beam search's
    reordering of it is seen. Not for use under autocast (`supports` sends that to the module forward).
    """

    def __init__(self, model: GPT, cache: KVCache) -> None:
        t = model.transformer
        rows, C, nh = cache.batch_size, model.config.n_embd, model.config.n_head
        self.cache, self.rows, self.device_type = cache, rows, t.wte.weight.device.type
        self.wte, self.wpe = t.wte.weight, t.wpe.weight
        # Every projection has its own place for its output in one buffer, which each step first fills with all the
        # biases (zeros where there is none) in one copy; addmm(out, x, W.t(), out=out) then adds the product to
        # it, as addmm(bias, x, W.t()) does after copying the bias into its fresh output itself. That was 48 small
        # copies, each a cold operation between two products. Each place starts on a 64-byte boundary, as a fresh
        # tensor does: MKL's one-row product sums in another order into an unaligned output (other bits).
        layers = [(b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj) for b in t.h]
        linears = [linear for layer in layers for linear in layer]
        align = max(1, 64 // t.wte.weight.element_size())  # elements per 64 bytes
        bounds, end = [], 0
        for linear in linears:
            start = -(-end // align) * align  # 64-byte aligned, as a tensor of its own would be (see above)
            end = start + rows * linear.out_features
            bounds.append((start, end))
        self.biases = t.wte.weight.new_zeros(end)
        self.outputs = torch.empty_like(self.biases)
        places = []
        for linear, (start, end) in zip(linears, bounds):
            self.biases[start:end].view(rows, -1).copy_(_bias(linear))  # (rows, out) <- (out,)
            places.append(self.outputs[start:end].view(rows, -1))
        self.blocks = []
        for i, (block, (c_attn, c_proj, c_fc, mlp_proj)) in enumerate(zip(t.h, layers)):
            qkv_out, proj_out, fc_out, mlp_proj_out = places[4 * i:4 * i + 4]
            heads = qkv_out.view(rows, 3, nh, 1, C // nh)  # (rows, 3C) -> (rows, 3, nh, 1, hs): q, k, v by head
            self.blocks.append((_norm(block.ln_1), _projection(c_attn, qkv_out, result_in_out=True), heads[:, 0],
                                heads[:, 1:], _projection(c_proj, proj_out), _norm(block.ln_2),
                                _projection(c_fc, fc_out), _projection(mlp_proj, mlp_proj_out)))
        self.ln_f = _norm(t.ln_f)
        # The head has no bias (`supports`): packed (prepack.py), or a product with the transposed table.
        packed_head = vars(model.lm_head).get("forward")
        self.head = packed_head or functools.partial(torch.mm, mat2=model.lm_head.weight.t())

    def __call__(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (rows,); attention_mask (rows, cached + 1), 0 on left padding, or None -> logits (rows, vocab)."""
        past = self.cache.length
        if past == self.cache.max_len:
            raise ValueError(f"KV cache is full: {past + 1} positions needed, {past} allocated")
        if torch.is_autocast_enabled(self.device_type):
            raise ValueError("DecodeStep does not follow autocast; run the model's forward under autocast instead")
        if tokens.shape != (self.rows,):
            raise ValueError(f"DecodeStep takes one token for each of the cache's {self.rows} rows, got tokens of "
                             f"shape {tuple(tokens.shape)}")
        # Everything a step needs besides the products and the arithmetic between them is made here, in one go:
        # the views of every layer's cache, and the biases in the output buffer (see __init__).
        kv = self.cache.kv  # (n_layer, 2, rows, nh, max_len, hs)
        slots = kv.narrow(4, past, 1).transpose(1, 2).unbind(0)  # n_layer x (rows, 2, nh, 1, hs): this position
        # n_layer x (rows, nh, past + 1, hs) each: the keys and values so far, this position's included
        keys, values = (side.unbind(0) for side in kv.narrow(4, 0, past + 1).unbind(1))
        self.outputs.copy_(self.biases)
        rows = self.rows
        if attention_mask is None:
            x = F.embedding(tokens, self.wte) + self.wpe[past]  # (rows, C) + (C,)
            mask = None
        else:
            # Positions count real tokens only and the mask hides padding, as in the module forward.
            x = F.embedding(tokens, self.wte) + F.embedding(attention_mask.long().sum(-1) - 1, self.wpe)
            mask = attention_masks(1, past, attention_mask, tokens.device, "sdpa")[0]  # (rows, 1, 1, past + 1)
        C = x.shape[-1]
        for (ln_1, c_attn, q, new_kv, c_proj, ln_2, c_fc, mlp_proj), slot, k, v in zip(self.blocks, slots, keys,
                                                                                     values):
            c_attn(ln_1(x))  # into the buffer of which q (rows, nh, 1, hs) and new_kv (rows, 2, nh, 1, hs) are views
            slot.copy_(new_kv)  # into the cache: new_kv views key and value together, so one copy writes both
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (rows, nh, 1, hs)
            # x is this step's own tensor: adding in place spares an allocation, with the same sums.
            x += c_proj(y.view(rows, C))  # (rows, nh, 1, hs) -> (rows, C): already in that order
            x += mlp_proj(_gelu(c_fc(ln_2(x))))
        self.cache.advance(1)
        return self.head(self.ln_f(x))


def _projection(linear: nn.Linear, out: torch.Tensor, result_in_out: bool = False) -> Fn:
    """x (rows, in) -> linear(x) (rows, out_features), without nn.Module's call machinery, for an `out` that holds
    the bias when it is called (see DecodeStep).

    The product is added to `out` in place, through a view of the transposed weight made once here (F.linear would
    make it again at every call, a cold operation). A forward replaced on the instance (prepack.py's packed
    product) is called instead; its result is a new tensor, copied into `out` if `result_in_out`.
    """
    replaced = vars(linear).get("forward")
    if replaced is None:
        return functools.partial(torch.addmm, out, mat2=linear.weight.t(), out=out)  # (out, in) -> (in, out) view
    if result_in_out:
        return lambda x: out.copy_(replaced(x))
    return replaced


def _bias(linear: nn.Linear) -> torch.Tensor:
    """The bias, or zeros in its place (adding a zero changes no bit of a product)."""
    if linear.bias is not None:
        return linear.bias.detach()
    return linear.weight.new_zeros(linear.out_features)


def _norm(ln: nn.LayerNorm) -> Fn:
    """x (rows, C) -> ln(x), without nn.Module's call machinery."""
    # torch.layer_norm is the op F.layer_norm calls after its Python-level checks.
    return functools.partial(torch.layer_norm, normalized_shape=ln.normalized_shape, weight=ln.weight, bias=ln.bias,
                             eps=ln.eps)


_gelu = functools.partial(F.gelu, approximate="tanh")  # model.gelu_tanh, without a Python call around it
