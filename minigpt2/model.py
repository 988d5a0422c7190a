"""GPT-2, written out by hand.

    input_ids (B, T)
      -> token embedding wte + position embedding wpe        (B, T, C)
      -> n_layer x Block:  x = x + attn(ln_1(x));  x = x + mlp(ln_2(x))
      -> ln_f -> lm_head (the transpose of wte: tied weights) (B, T, vocab_size)

Module names are the Hub's (`transformer.wte`, `transformer.h.N.attn.c_attn`, `transformer.ln_f`, ...), so loading a
checkpoint needs no renaming, only a transpose of the four projection weights, which the Hub stores as Conv1D
(in, out) rather than nn.Linear (out, in) (see `hub.py`). B = batch, T = tokens, C = n_embd, nh = n_head,
hs = C // nh.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .config import GPTConfig
from .generation_config import GenerationConfig
from .loss import lm_loss

if TYPE_CHECKING:
    from .kv_cache import KVCache


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's GELU: the tanh approximation 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), not the exact erf form."""
    return F.gelu(x, approximate="tanh")


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout: in training, zero each element with probability p and scale the survivors by 1 / (1 - p).

    On a GPU this is F.dropout's fused kernel. On a CPU, F.dropout draws its mask through bernoulli_, one double per
    element, and the draws made dropout about 12% of a gpt2 training step: the generator yields 32 bits at a time
    and is the bottleneck. Here each element gets 16 bits, cut from full 64-bit draws (four elements per draw), so p
    is rounded to a multiple of 2^-16 (0.1 becomes 0.1000061); the survivors are scaled by 1 / (1 - rounded p), so
    the expectation stays exactly x. The mask multiplies (faster than torch.where); backward multiplies by it again.
    """
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, training=True) if p < 1.0 else x * 0.0
    dropped = round(p * 2**16)  # of the 2^16 values of 16 random bits, this many drop an element
    if dropped == 0:
        return x
    if dropped == 2**16:
        return x * 0.0  # everything dropped (and no division by zero)
    n = x.numel()
    draws = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-2**63, None)  # uniform on all 2^64 values
    bits = draws.view(torch.int16)[:n].view(x.shape)  # each uniform on [-2^15, 2^15)
    keep = bits >= dropped - 2**15
    scale = 2**16 / (2**16 - dropped)
    if x.dtype == torch.float32:
        return x * keep.to(x.dtype).mul_(scale)  # one fp32 mask of 0 and scale, for forward and backward alike
    return x * keep * scale  # a Python float scale: in bf16 a mask holding it would round the scale


class Dropout(nn.Module):
    """nn.Dropout with the CPU-friendly mask of `dropout`."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                    dropout_p: float = 0.0) -> torch.Tensor:
    """Attention as the formula reads: softmax(q k^T / sqrt(hs) + mask) v.

    q: (B, nh, Tq, hs); k, v: (B, nh, Tk, hs); mask: bool, broadcastable to (B, nh, Tq, Tk), True where a query may
    look at a key, or None for plain causal attention where the queries are the last Tq of the Tk positions.
    """
    Tq, Tk = q.shape[-2], k.shape[-2]
    # Scaling q instead of the scores gives the same product and touches Tk / hs times fewer numbers.
    scores = (q / math.sqrt(q.shape[-1])) @ k.transpose(-2, -1)  # (B, nh, Tq, hs) @ (B, nh, hs, Tk) -> (B, nh, Tq, Tk)
    if mask is None:
        mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - Tq)
    # The mask as the formula has it, added: 0 where a key is seen, -inf where not. In place (the product is this
    # function's own temporary), a broadcast add is several times faster than masked_fill_, and passes the
    # gradient through untouched.
    scores += torch.zeros(mask.shape, dtype=scores.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
    weights = F.softmax(scores.float(), dim=-1).to(q.dtype)
    weights = dropout(weights, dropout_p, training=dropout_p > 0)
    return weights @ v  # (B, nh, Tq, Tk) @ (B, nh, Tk, hs) -> (B, nh, Tq, hs)


def attention_masks(T: int, past: int, attention_mask: torch.Tensor | None, device: torch.device,
                    attn_impl: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(mask, key_padding): the boolean mask (B or 1, 1, T, past + T) of which keys each query may see, or None
    for plain causal; and the (B, T) key-padding mask for the triton kernel, or None.

    A query sees keys at or before its own position that are not padding. It always sees itself, so that a
    padding query (whose every key is padding) gets finite, ignored output instead of NaN. Without padding, no
    mask is needed for a prompt (past == 0) or for one new token after a cache (it sees every key): the common
    decoding step builds nothing. The kernel takes the padding alone (it applies causality itself), and runs
    only on a prompt (past == 0): the other paths take the full mask.
    """
    key_padding = attention_mask.bool() if attention_mask is not None else None
    # Under torch.compile the all-ones test would be a data-dependent branch (a graph break): keep the mask there.
    if key_padding is not None and not torch.compiler.is_compiling() and bool(key_padding.all()):
        key_padding = None
    if key_padding is None and (past == 0 or T == 1):
        return None, None
    q_pos = torch.arange(past, past + T, device=device).unsqueeze(1)  # (T, 1)
    k_pos = torch.arange(past + T, device=device).unsqueeze(0)        # (1, past + T)
    mask = (k_pos <= q_pos)[None, None]                                # (1, 1, T, past + T)
    if key_padding is not None:
        mask = mask & (key_padding[:, None, None, :] | (k_pos == q_pos))  # (B, 1, T, past + T)
    return mask, (key_padding if attn_impl == "triton" and past == 0 else None)


def _triton_runs_on(device: torch.device) -> bool:
    try:
        import kernels
    except ImportError:
        return False
    return kernels.runs_on(device)


TRITON_HEAD_SIZES = (16, 32, 64, 128)  # the head sizes kernels/flash_attention.py has tiles for
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # the q, k, v dtypes it takes


def resolve_attn_impl(name: str, device: torch.device, head_size: int, dtype: torch.dtype) -> str:
    """The attention to use on `device` for `dtype` activations: "auto" picks triton on a CUDA GPU with triton
    installed when attention runs in fp16 or bf16 with a head size the kernel has tiles for, else sdpa.

    fp32 is left to sdpa because the kernel's exact fp32 matmuls spill registers heavily (docs/benchmarks.md,
    "Compiled for GPUs without one"). An explicit "triton" that cannot run here falls back to sdpa with a one-time
    warning rather than failing in the middle of training or generation.
    """
    if name == "auto":
        fast = device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and head_size in TRITON_HEAD_SIZES
        return "triton" if fast and _triton_runs_on(device) else "sdpa"
    if name == "triton":
        if head_size not in TRITON_HEAD_SIZES:
            _warn_once(f"attn_impl='triton' supports head sizes {TRITON_HEAD_SIZES}, not {head_size}; using sdpa")
            return "sdpa"
        if dtype not in TRITON_DTYPES:
            _warn_once(f"attn_impl='triton' supports {', '.join(map(str, TRITON_DTYPES))}, not {dtype}; using sdpa")
            return "sdpa"
        if not _triton_runs_on(device):
            _warn_once("attn_impl='triton' needs triton 3.4 or newer and a CUDA GPU (or TRITON_INTERPRET=1); "
                       "using sdpa instead")
            return "sdpa"
    return name


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        import warnings

        warnings.warn(message, stacklevel=3)


class CausalSelfAttention(nn.Module):
    """Multi-head attention in which each position sees itself and the positions before it (and, with a KV cache,
    every cached one), followed by the output projection: (B, T, C) -> (B, T, C)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        # q, k and v from one C -> 3C projection (weight (3C, C)): one large matmul beats three
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.attn_pdrop = config.attn_pdrop
        self.resid_dropout = Dropout(config.resid_pdrop)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, key_padding: torch.Tensor | None,
                attn_impl: str, kv_cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.c_attn(x)
        # (B, T, 3C) -> 3 x (B, T, nh, hs) -> 3 x (B, nh, T, hs)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in qkv.split(C, dim=2))
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)  # (B, nh, T_past + T, hs)
        dropout_p = self.attn_pdrop if self.training else 0.0
        if attn_impl == "naive" or (dropout_p > 0.0 and x.device.type == "cpu"):
            # With attention dropout, SDPA on a CPU runs this same formula unfused anyway, with F.dropout's slower mask.
            y = naive_attention(q, k, v, mask, dropout_p)
        elif attn_impl == "triton" and q.shape[2] == k.shape[2] and dropout_p == 0.0:
            # The kernel has no attention dropout and handles self-attention only (not a cached decode step).
            from kernels import flash_attention

            # The kernel takes a row of padding per sequence; a one-row attention_mask stands for every row, as
            # the broadcast masks of the other paths read it.
            y = flash_attention(q, k, v, key_padding_mask=None if key_padding is None else key_padding.expand(B, T))
        else:
            # SDPA's is_causal lines queries up with the first keys, so it is for Tq == Tk only; a single new query
            # after a cache (no mask) sees every key.
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                               is_causal=mask is None and T > 1)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, nh, T, hs) -> (B, T, nh, hs) -> (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """The position-wise feed-forward layer: C -> 4C, GELU (tanh form, as GPT-2 trained with), 4C -> C."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.mlp_size)
        self.c_proj = nn.Linear(config.mlp_size, config.n_embd)
        self.dropout = Dropout(config.resid_pdrop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(gelu_tanh(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: each sub-layer sees a normalised input and adds to the residual stream."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, key_padding: torch.Tensor | None,
                attn_impl: str, kv_cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask, key_padding, attn_impl, kv_cache, layer)
        return x + self.mlp(self.ln_2(x))


# Below this many rows, copying the table (a read and a write of 154 MB in fp32, about 0.08 ms on an H200) costs
# more than the unaligned product loses (11.6 ms over 16,384 rows there: about 0.7 us a row).
ALIGNED_HEAD_MIN_ROWS = 256


def aligned_linear(x: torch.Tensor, weight: torch.Tensor, multiple: int = 64) -> torch.Tensor:
    """x @ weight^T, (..., C) -> (..., V), computed into rows of V rounded up to `multiple` and returned as a view.

    GPT-2's 50,257 logits a row do not start each row on a 16-byte boundary in bf16, and cuBLAS's kernels for
    such outputs are slow: 16,384 x 768 x 50,257 took 13.5 ms on an H200, against 1.9 ms into rows of 50,304
    (benchmarks/step_parts.py). The table is padded with zero rows for the product, and the extra columns are
    sliced off; gradients flow through both steps as usual.
    """
    vocab = weight.shape[0]
    padded = F.pad(weight, (0, 0, 0, -vocab % multiple))  # (V, C) -> (V_pad, C), zero rows
    return F.linear(x, padded)[..., :vocab]  # (..., V_pad) -> (..., V), rows V_pad apart


class GPT(nn.Module):
    """The GPT-2 language model: `model(input_ids)` -> next-token logits of shape (B, T, vocab_size).

    `generation_config` holds the defaults of `generate()`: those of a loaded checkpoint's generation_config.json,
    else, as in transformers, the end-of-text id of the config (none when the vocabulary is too small to hold 50256).
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.generation_config: GenerationConfig = GenerationConfig.from_model_config(config.to_hf_dict())
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.n_positions, config.n_embd),
            drop=Dropout(config.embd_pdrop),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # The output projection reuses the input embedding: the score of token v is <h, wte[v]>.
        self.lm_head.weight = self.transformer.wte.weight
        self.gradient_checkpointing = False
        self.apply(self._init_weights)
        # GPT-2 scales the init of the layers that write into the residual stream by 1/sqrt(2 n_layer), so the
        # stream's variance does not grow with depth (two such writes per block).
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(param, mean=0.0, std=config.initializer_range / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameter count (the tied head counted once); optionally without the position and token embeddings."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.transformer.wpe.weight.numel() + self.transformer.wte.weight.numel()
        return n

    def forward(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, kv_cache: KVCache | None = None) -> torch.Tensor:
        """Logits (B, T, vocab_size) for `input_ids` (B, T).

        attention_mask: (B, T_past + T) of 1 for real tokens and 0 for (left) padding, covering cached positions
            too; position ids then count real tokens only, so a left-padded prompt sees the same positions as alone.
        position_ids: (B, T) explicit positions, overriding the above.
        kv_cache: when given, keys/values of earlier calls are reused and this call's are appended.
        """
        hidden = self.hidden_states(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                    kv_cache=kv_cache)
        return self.head(hidden)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final LayerNorm, then the tied projection onto the vocabulary: (..., C) -> (..., vocab_size).

        Generation applies it to the last position only, skipping the largest matmul for the others. On a GPU, for
        many rows, the logits come from `aligned_linear` (a view whose rows are a multiple of 64 apart).
        """
        hidden = self.transformer.ln_f(hidden)
        rows = hidden.numel() // hidden.shape[-1]
        # Under torch.compile, inductor pads the product's output by itself. For a few rows (decoding), copying the
        # table would cost more than the unaligned product loses.
        if hidden.is_cuda and rows >= ALIGNED_HEAD_MIN_ROWS and not torch.compiler.is_compiling():
            return aligned_linear(hidden, self.lm_head.weight)
        return self.lm_head(hidden)

    def hidden_states(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None, kv_cache: KVCache | None = None) -> torch.Tensor:
        """The residual stream after the last block, (B, T, C); `forward` without the head (same arguments)."""
        B, T = input_ids.shape
        past = kv_cache.length if kv_cache is not None else 0
        if past + T > self.config.n_positions:
            raise ValueError(f"sequence of {past + T} tokens is longer than the model's context of "
                             f"{self.config.n_positions} positions; truncate the input or use a sliding window")
        if attention_mask is not None and (attention_mask.dim() != 2 or attention_mask.shape[0] not in (1, B)
                                           or attention_mask.shape[1] != past + T):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, and {B} rows of {T} tokens "
                             f"after {past} cached ones need ({B}, {past + T}): one column per cached or new token")
        if position_ids is None:
            if attention_mask is not None:
                # Count real tokens before each position: left padding does not shift the prompt's positions.
                # (B, past + T) -> (B, T): this call's columns
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:past + T]
            else:
                position_ids = torch.arange(past, past + T, device=input_ids.device).unsqueeze(0)  # (T,) -> (1, T)
        attn_impl = resolve_attn_impl(self.config.attn_impl, input_ids.device, self.config.head_size,
                                      self._attention_dtype(input_ids.device))
        if self.config.attn_impl == attn_impl == "triton" and self.training and self.config.attn_pdrop > 0:
            _warn_once(f"attn_impl='triton' has no attention dropout: training with attn_pdrop="
                       f"{self.config.attn_pdrop} runs sdpa (on a CPU, the naive attention) instead; set it to 0 "
                       "(train.py --dropout 0) to train with the kernel")
        mask, key_padding = attention_masks(T, past, attention_mask, input_ids.device, attn_impl)

        x = self.transformer.wte(input_ids) + self.transformer.wpe(position_ids)  # (B, T, C)
        x = self.transformer.drop(x)
        for layer, block in enumerate(self.transformer.h):
            # Recomputing a block in backward saves memory only where there is a backward; with a cache (decoding)
            # the block must also write its keys and values there, which a recomputation would do twice.
            if self.gradient_checkpointing and self.training and kv_cache is None:
                x = torch.utils.checkpoint.checkpoint(block, x, mask, key_padding, attn_impl, use_reentrant=False)
            else:
                x = block(x, mask, key_padding, attn_impl, kv_cache, layer)
        if kv_cache is not None:
            kv_cache.advance(T)
        return x

    def _attention_dtype(self, device: torch.device) -> torch.dtype:
        """The dtype of the attention's q, k and v: autocast's when it is on, else the weights'."""
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
        return self.transformer.wte.weight.dtype

    def loss(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, ignore_index: int = -100,
             **forward_kwargs: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy, as transformers computes it: position t predicts labels[t + 1].

        labels defaults to input_ids; positions labelled `ignore_index` (e.g. padding) are not scored.
        """
        labels = input_ids if labels is None else labels
        logits = self(input_ids, **forward_kwargs)
        # The last position has nothing to predict: an ignored target, rather than slicing (and copying) the logits.
        targets = F.pad(labels[:, 1:], (0, 1), value=ignore_index)
        return lm_loss(logits, targets, ignore_index)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """Continue `input_ids` (B, T); returns the full sequences, prompt included. See `generate.py`."""
        from .generate import generate

        return generate(self, input_ids, attention_mask=attention_mask, **kwargs)

    @classmethod
    def from_pretrained(cls, name_or_path: str, revision: str | None = None, **config_overrides) -> GPT:
        """Load a Hub id (`gpt2`, `openai-community/gpt2-xl`, ...), at `revision` (a branch, tag or commit hash) if
        given, or a save_pretrained directory. See `hub.py`.

        `config_overrides` change how the model runs, never the function its weights were trained for: the dropouts
        (embd_pdrop, attn_pdrop, resid_pdrop), initializer_range and attn_impl; any other name is a ConfigError.
        """
        from .hub import load_pretrained

        return load_pretrained(name_or_path, revision, **config_overrides)

    def save_pretrained(self, directory: str | os.PathLike[str]) -> None:
        """Write config.json, model.safetensors and generation_config.json in the Hub's GPT-2 layout."""
        from .hub import save_pretrained

        save_pretrained(self, directory)

