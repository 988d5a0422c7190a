"""GPTConfig: every number that shapes a GPT-2, with the four official sizes as presets.

Field names follow transformers' `GPT2Config`, so a Hub `config.json` maps onto this dataclass field for field.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any

from .errors import CheckpointError, ConfigError

EOT_ID = 50256  # <|endoftext|>: GPT-2 uses it as both start and end of text
ATTN_IMPLS = ("naive", "sdpa", "triton", "auto")
# transformers' two names for the tanh approximation of GELU, which GPT-2 uses (model.gelu_tanh): one formula written
# out in Python, and torch's kernel for it; they differ by rounding only.
TANH_GELU_NAMES = ("gelu_new", "gelu_pytorch_tanh")
HUB_ORG = "openai-community/"  # where the Hub keeps OpenAI's GPT-2 checkpoints; "gpt2" is short for theirs
# The fields of the function the weights were trained for: set by config.json alone, never by a caller of
# from_pretrained (n_head and layer_norm_epsilon change no tensor's shape, so nothing else would catch them).
ARCHITECTURE = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "layer_norm_epsilon")
# GPT2Config's other names for four fields (its attribute_map): transformers reads a config.json that uses them as
# if it used ours. Read as ours too: the head count in particular changes no tensor's shape, so a default put in its
# place would load without complaint and compute another model.
HF_ALIASES = {"hidden_size": "n_embd", "max_position_embeddings": "n_positions", "num_attention_heads": "n_head",
              "num_hidden_layers": "n_layer"}


@dataclass
class GPTConfig:
    """Shape and regularisation of a GPT-2 model.

    `n_embd` must be divisible by `n_head`; GPT-2 uses a head size of 64 in every size. `attn_impl` chooses how
    attention is computed ("naive": the explicit formula, "sdpa": torch's fused kernel, "triton": our kernel,
    "auto": triton on a CUDA GPU when installed, attention runs in fp16/bf16 and the head size is 16, 32, 64 or
    128, else sdpa); it changes speed, and the result only by rounding.
    """

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    layer_norm_epsilon: float = 1e-5
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    resid_pdrop: float = 0.1
    initializer_range: float = 0.02
    attn_impl: str = "sdpa"

    def __post_init__(self) -> None:
        # Each field's type and range first: the divisibility check below divides by n_head, and a config.json
        # value of the wrong type would otherwise surface as a TypeError deep inside the model's constructor.
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            if not (is_integer(getattr(self, name)) and getattr(self, name) > 0):
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.n_inner is not None and not (is_integer(self.n_inner) and self.n_inner > 0):
            raise ConfigError(f"n_inner must be a positive integer or None (4 * n_embd), got {self.n_inner!r}")
        for name in ("layer_norm_epsilon", "initializer_range"):
            value = getattr(self, name)
            if not (is_real(value) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
        for name in ("embd_pdrop", "attn_pdrop", "resid_pdrop"):
            value = getattr(self, name)
            if not (is_real(value) and 0 <= value < 1):
                raise ConfigError(f"{name} must be a probability in [0, 1), got {value!r}")
        if self.attn_impl not in ATTN_IMPLS:
            raise ConfigError(f"attn_impl={self.attn_impl!r} is not one of {', '.join(ATTN_IMPLS)}")
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_size(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> GPTConfig:
        """A preset by name: gpt2, gpt2-medium, gpt2-large, gpt2-xl, or `tiny` for tests and quick runs."""
        if not is_preset(name):
            raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return dataclasses.replace(PRESETS[preset_key(name)], **overrides)

    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` that transformers' GPT2Config reads."""
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": self.vocab_size,
            "n_positions": self.n_positions,
            "n_ctx": self.n_positions,
            "n_embd": self.n_embd,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_inner": self.n_inner,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "embd_pdrop": self.embd_pdrop,
            "attn_pdrop": self.attn_pdrop,
            "resid_pdrop": self.resid_pdrop,
            "initializer_range": self.initializer_range,
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
            "tie_word_embeddings": True,
            "bos_token_id": EOT_ID if self.vocab_size > EOT_ID else None,
            "eos_token_id": EOT_ID if self.vocab_size > EOT_ID else None,
        }

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], source: str = "config.json", **overrides: Any) -> GPTConfig:
        """Read a transformers GPT-2 `config.json`, refusing variants this model does not implement."""
        model_type = data.get("model_type", "gpt2")
        if model_type != "gpt2":
            raise CheckpointConfigError(f"{source}: model_type is {model_type!r}; minigpt2 loads GPT-2 models only")
        unsupported = {
            "scale_attn_weights": (True, data.get("scale_attn_weights", True)),
            "scale_attn_by_inverse_layer_idx": (False, data.get("scale_attn_by_inverse_layer_idx", False)),
            "reorder_and_upcast_attn": (False, data.get("reorder_and_upcast_attn", False)),
            "tie_word_embeddings": (True, data.get("tie_word_embeddings", True)),
        }
        for key, (expected, got) in unsupported.items():
            if got != expected:
                raise CheckpointConfigError(f"{source}: {key}={got!r} is not supported (GPT-2 uses {expected!r})")
        activation = data.get("activation_function", "gelu_new")
        if activation not in TANH_GELU_NAMES:
            raise CheckpointConfigError(f"{source}: activation_function={activation!r} is not supported (GPT-2 uses "
                                        "'gelu_new', the tanh approximation of GELU, also named 'gelu_pytorch_tanh')")
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in fields and k != "attn_impl"}
        for alias, name in HF_ALIASES.items():
            if alias not in data:
                continue
            if name in values and values[name] != data[alias]:
                raise CheckpointConfigError(f"{source}: {name}={values[name]!r} and its other name {alias}="
                                            f"{data[alias]!r} disagree; keep the right one and delete the other")
            values[name] = data[alias]
        try:
            config = cls(**values)
        except ConfigError as exc:
            raise CheckpointConfigError(f"{source}: {exc}; fix the file or save the model again") from None
        # Applied after the file's values are checked, so that a bad override is not blamed on the file.
        settable = [f.name for f in dataclasses.fields(cls) if f.name not in ARCHITECTURE]
        for name, value in overrides.items():
            if name not in settable:
                raise ConfigError(f"{name}={value!r} cannot be set when loading a checkpoint: "
                                  f"{'the checkpoint fixes it' if name in ARCHITECTURE else 'no such setting'}; "
                                  f"from_pretrained takes revision and {', '.join(settable)}")
        return dataclasses.replace(config, **overrides)


def is_integer(value: Any) -> bool:
    """A whole number of an integer type (numpy's too): not 2.0, and not True (a bool is an int in Python). For
    checking settings read from JSON, TOML or keyword arguments."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """A number (NaN and inf included: callers exclude them where they must), not a bool or a string."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


class CheckpointConfigError(CheckpointError, ConfigError):
    """A checkpoint's config.json describes a model minigpt2 cannot build."""


PRESETS: dict[str, GPTConfig] = {
    "gpt2": GPTConfig(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": GPTConfig(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": GPTConfig(n_layer=48, n_head=25, n_embd=1600),
    # Same vocabulary and head size as GPT-2, a fraction of the depth and width: trains from scratch on a laptop.
    "tiny": GPTConfig(n_layer=4, n_head=4, n_embd=256, n_positions=256),
}


def preset_key(name: str) -> str:
    """A preset name without the Hub's organisation: openai-community/gpt2 and gpt2 are one preset."""
    return name.removeprefix(HUB_ORG)


def is_preset(name: str) -> bool:
    """Whether `name` is a preset's name, spelled bare (gpt2) or with the Hub's organisation (openai-community/gpt2)."""
    return preset_key(name) in PRESETS
