"""GenerationConfig: every setting of `generate()`, with transformers' names, defaults and meanings.

A call written for transformers' `model.generate(input_ids, max_new_tokens=40, do_sample=True, top_p=0.9)` means the
same here. Defaults are transformers' (and GPT-2's `generation_config.json`): 20 new tokens, greedy, `top_k=50` once
sampling is switched on, `<|endoftext|>` (50256) as end of sequence and, unless given, as padding.

A model carries its own defaults as `model.generation_config`, which `generate()` starts from when it is given no
config, as transformers' does: a loaded checkpoint's `generation_config.json` (`from_hub_dict`), or without that
file the token ids of its `config.json` (`from_model_config`). `to_hub_dict` writes the file back.

The decoding strategy follows from three settings, as in transformers:

    num_beams == 1, do_sample False  -> greedy search: always the most likely token
    num_beams == 1, do_sample True   -> multinomial sampling from the processed distribution
    num_beams  > 1, do_sample False  -> beam search: keep the num_beams best partial sequences
    num_beams  > 1, do_sample True   -> beam search whose candidates are sampled instead of taken best-first

`validate()` rejects settings that cannot mean anything (temperature 0 with sampling, top_p 1.5, ...), or whose
arithmetic overflows float32 (a temperature of 1e-40), with a SettingError (a ConfigError) naming the setting;
`STRATEGIES` holds the named presets that `sample.py --strategy` offers.
"""

from __future__ import annotations

import dataclasses
import math
import shlex
from dataclasses import dataclass, field
from typing import Any

from .config import EOT_ID, CheckpointConfigError, is_integer, is_real
from .errors import ConfigError

DEFAULT_NEW_TOKENS = 20  # transformers' default when neither max_new_tokens nor max_length is given
FLOAT32_MAX = 3.4028234663852886e38  # the largest float32: scores are float32
# A score divided by a temperature or repetition penalty below MIN_DIVISOR can overflow to inf, and a softmax over
# inf is NaN, which sampling cannot draw from (transformers fails there too: "probability tensor contains either inf,
# nan"). The bound keeps scores up to 3e8 finite, far beyond any GPT-2's logits; a smaller value would change nothing
# anyway, as sampling at 1e-30 already picks the most likely token.
MIN_DIVISOR = 1e-30

# Settings of transformers' GenerationConfig (5.24) that minigpt2 does not implement, each with the value at which it
# has no effect (None, "not set", always has none). Older transformers wrote every setting into
# generation_config.json, so files list many of these at that value.
UNSUPPORTED_SETTINGS: dict[str, Any] = {
    "min_length": 0, "max_time": None, "top_h": None, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
    "encoder_repetition_penalty": 1.0, "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None,
    "renormalize_logits": False, "forced_bos_token_id": None, "forced_eos_token_id": None,
    "remove_invalid_values": False, "exponential_decay_length_penalty": None, "suppress_tokens": None,
    "begin_suppress_tokens": None, "sequence_bias": None, "token_healing": False, "guidance_scale": 1.0,
    "watermarking_config": None, "num_beam_groups": 1, "diversity_penalty": 0.0, "penalty_alpha": None,
    "dola_layers": None, "constraints": None, "force_words_ids": None, "use_mtp": False,
    "prompt_lookup_num_tokens": None, "assistant_early_exit": None, "speculation_type": None,
}
# Settings of transformers' GenerationConfig that never change which tokens come out: what generate() returns besides
# them, caching and compilation, the start id (used only without a prompt; ours always has one), the decoder start
# (encoder-decoder models only), the tuning of assisted decoding (which needs an assistant model, or
# prompt_lookup_num_tokens above), and file metadata.
INERT_SETTINGS = frozenset({
    "output_attentions", "output_hidden_states", "output_scores", "output_logits", "return_dict_in_generate",
    "use_cache", "cache_implementation", "cache_config", "max_cache_len", "prefill_chunk_size", "compile_config",
    "disable_compile", "continuous_batching_config", "low_memory", "bos_token_id", "decoder_start_token_id",
    "is_assistant", "num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold",
    "assistant_lookbehind", "target_lookbehind", "assistant_ensemble_weight", "max_matching_ngram_size",
    "transformers_version", "_from_model_config", "_commit_hash",
})
# Of those, the ones that ask transformers' generate() to return more than the sequences: refused when on.
RETURN_SETTINGS = frozenset({"output_attentions", "output_hidden_states", "output_scores", "output_logits",
                             "return_dict_in_generate"})
# transformers' generate() reads None given for these as "off" (its processors test `is not None`), not as unset.
NONE_MEANS_OFF: dict[str, Any] = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "typical_p": 1.0,
                                  "repetition_penalty": 1.0, "no_repeat_ngram_size": 0}


class SettingError(ConfigError):
    """One generation setting is out of range or contradicts another. `name`, `value` and `why` are kept apart so
    that a command line can say which flag, preset or file the value came from."""

    def __init__(self, name: str, value: Any, why: str) -> None:
        super().__init__(f"{name}={value!r}: {why}")
        self.name, self.value, self.why = name, value, why

    def as_flag(self, flag: str | None = None) -> str:
        """The message for a command line where `--flag` (default: the setting's name) gave the value."""
        if isinstance(self.value, bool):
            shown = str(self.value).lower()  # as typed: --do_sample true
        elif isinstance(self.value, list) and all(isinstance(item, str) for item in self.value):
            # --stop_strings '' 'a\n': as typed (sample.py reads \n and \t as those characters), on one line
            shown = " ".join(shlex.quote(item.replace("\n", "\\n").replace("\t", "\\t")) for item in self.value)
        elif isinstance(self.value, list):
            shown = ",".join(map(str, self.value))  # --eos_token_id 1,2
        else:
            shown = str(self.value)
        return f"--{flag or self.name} {shown}: {self.why}"


def _setting(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class GenerationConfig:
    """How `generate()` continues a prompt. Field names and semantics are transformers'."""

    max_new_tokens: int | None = _setting(None, "tokens to generate after the prompt (20 unless this or max_length "
                                                "is given)")
    max_length: int | None = _setting(None, "prompt + new tokens; max_new_tokens wins over it")
    min_new_tokens: int = _setting(0, "end-of-sequence is forbidden before this many new tokens")
    do_sample: bool = _setting(False, "sample from the distribution instead of taking the most likely token(s)")
    temperature: float = _setting(1.0, "divide the logits by this before sampling: < 1 sharpens, > 1 flattens")
    top_k: int = _setting(50, "sample among the k most likely tokens only; 0 disables")
    top_p: float = _setting(1.0, "nucleus: sample among the fewest tokens whose probability reaches top_p; 1 "
                                 "disables")
    min_p: float | None = _setting(None, "drop tokens less likely than min_p times the most likely one")
    typical_p: float = _setting(1.0, "locally typical sampling: keep this much probability mass; 1 disables")
    repetition_penalty: float = _setting(1.0, "CTRL penalty on tokens already in the sequence; > 1 discourages "
                                              "repeats")
    no_repeat_ngram_size: int = _setting(0, "never repeat an n-gram of this size; 0 disables")
    num_beams: int = _setting(1, "beam width; 1 means no beam search")
    length_penalty: float = _setting(1.0, "beam scores are divided by length ** this; > 0 favours longer "
                                          "hypotheses")
    early_stopping: bool | str = _setting(False, "beam search stop rule: true, false or never")
    num_return_sequences: int = _setting(1, "sequences returned per prompt")
    eos_token_id: int | list[int] | None = _setting(EOT_ID, "end-of-sequence id(s); none disables")
    pad_token_id: int | None = _setting(None, "fills sequences that ended early (default: the first eos id)")
    stop_strings: list[str] | None = _setting(None, "stop once the text ends with one of these strings")
    sliding_window: bool = _setting(False, "past the model's context, drop the oldest tokens instead of raising "
                                           "an error (not with beam search)")

    @classmethod
    def from_kwargs(cls, base: GenerationConfig | None = None, **kwargs: Any) -> GenerationConfig:
        """`base` (or the defaults) with `kwargs` applied; an unknown name is a ConfigError that lists the known ones.

        `stop` is accepted as a short spelling of `stop_strings`, and a single string for it means a list of one.
        """
        if "stop" in kwargs:
            kwargs["stop_strings"] = kwargs.pop("stop")
        for key in [key for key in kwargs if key in INERT_SETTINGS or key in UNSUPPORTED_SETTINGS]:
            value = kwargs.pop(key)  # transformers' settings that change no token here, at these values
            if key in RETURN_SETTINGS and value:
                raise SettingError(key, value, "minigpt2's generate() returns the sequences only; leave it out")
            if key in UNSUPPORTED_SETTINGS and value not in (None, UNSUPPORTED_SETTINGS[key]):
                raise SettingError(key, value, "is not supported by minigpt2's generate(); leave it out")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ConfigError(f"unknown generation setting {unknown[0]!r}; known settings: {', '.join(sorted(known))}")
        for key, off in NONE_MEANS_OFF.items():
            if key in kwargs and kwargs[key] is None:
                kwargs[key] = off
        if isinstance(kwargs.get("stop_strings"), str):
            kwargs["stop_strings"] = [kwargs["stop_strings"]]
        if hasattr(kwargs.get("eos_token_id"), "tolist"):  # a tensor of ids, as transformers takes too
            kwargs["eos_token_id"] = kwargs["eos_token_id"].tolist()
        config = dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)
        config.validate()
        return config

    @classmethod
    def from_strategy(cls, name: str, base: GenerationConfig | None = None, **overrides: Any) -> GenerationConfig:
        """The named preset (see `STRATEGIES`) over `base` (or the defaults), with `overrides` on top."""
        if name not in STRATEGIES:
            raise ConfigError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
        return cls.from_kwargs(base, **{**STRATEGIES[name], **overrides})

    @classmethod
    def from_transformers(cls, config: Any, base: GenerationConfig | None = None) -> GenerationConfig:
        """transformers' GenerationConfig `config` over `base`, as its generate() merges a given config over the
        model's: the settings `config` leaves at None are `base`'s."""
        return cls.from_kwargs(base, **{key: value for key, value in config.to_dict().items() if value is not None})

    @classmethod
    def from_hub_dict(cls, data: dict[str, Any], source: str = "generation_config.json") -> GenerationConfig:
        """The settings of a checkpoint's `generation_config.json`, as transformers' `from_pretrained` reads them.

        As in transformers, a setting that is absent or null is not set and takes the global default, and there is
        no default end-of-sequence id: a file without one generates to the full length. A setting minigpt2 does not
        implement, at a value that would change the tokens, is a CheckpointConfigError naming it, and so is a key
        neither library knows (it may be a newer transformers' setting).
        """
        # An error, not a warning: the file is the checkpoint author's statement of how to decode, and text generated
        # without one of its settings is text those settings never produce, with nothing in it to show it. A warning
        # scrolls away in a training log while the samples are kept. The weights are not at stake, and the fix is one
        # edit of the file. (config.json variants that change the logits are refused for the same reason.)
        known = {f.name for f in dataclasses.fields(cls)}
        for key, value in data.items():
            if key in known or key in INERT_SETTINGS or value is None:
                continue
            if key not in UNSUPPORTED_SETTINGS:
                raise CheckpointConfigError(f"{source}: unknown generation setting {key!r}, which may change "
                                            "decoding; remove it from the file to decode without it")
            if value != UNSUPPORTED_SETTINGS[key]:
                raise CheckpointConfigError(f"{source}: {key}={value!r} is not supported by minigpt2's generate(); "
                                            "remove it from the file to decode without it")
        settings = {key: value for key, value in data.items() if key in known and value is not None}
        try:
            return cls.from_kwargs(**{"eos_token_id": None, **settings})
        except (TypeError, ConfigError) as exc:
            raise CheckpointConfigError(f"{source}: {exc}") from None

    @classmethod
    def from_model_config(cls, hf_config: dict[str, Any], source: str = "config.json") -> GenerationConfig:
        """The defaults transformers derives from a model's `config.json` when there is no generation_config.json:
        its generation settings (usually just the bos/eos/pad ids; old files list more), the model keys ignored."""
        names = {f.name for f in dataclasses.fields(cls)} | INERT_SETTINGS | set(UNSUPPORTED_SETTINGS)
        return cls.from_hub_dict({key: value for key, value in hf_config.items() if key in names}, source)

    def to_hub_dict(self) -> dict[str, Any]:
        """The `generation_config.json` that transformers reads back as these settings: those that differ from its
        defaults (which `from_hub_dict` applies to absent keys)."""
        unset = GenerationConfig(eos_token_id=None)
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) != getattr(unset, f.name)}

    @property
    def eos_ids(self) -> list[int]:
        """`eos_token_id` as a list (empty when there is none)."""
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    @property
    def pad_id(self) -> int | None:
        """The id that fills finished sequences: pad_token_id, else the first eos id (as transformers does)."""
        if self.pad_token_id is not None:
            return self.pad_token_id
        return self.eos_ids[0] if self.eos_ids else None

    def check_batch(self, prompts: int) -> None:
        """Raise ConfigError when `prompts` prompts cannot be continued together: with stop strings, the rows that
        stop before the others need an id to be filled with."""
        if self.pad_id is None and self.stop_strings and (prompts * self.num_return_sequences > 1
                                                          or self.num_beams > 1):
            raise SettingError("pad_token_id", None, "is needed to fill the sequences that stop_strings end before "
                               "the others, and there is no eos_token_id to use instead; set pad_token_id")

    def new_tokens(self, prompt_length: int) -> int:
        """How many tokens to generate after a (padded) prompt of `prompt_length` tokens."""
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        if self.max_length is not None:
            if self.max_length <= prompt_length:
                raise SettingError("max_length", self.max_length, f"leaves no room after the prompt of "
                                   f"{prompt_length} tokens; raise it or set max_new_tokens instead")
            return self.max_length - prompt_length
        return DEFAULT_NEW_TOKENS

    def validate(self) -> None:
        """Raise ConfigError naming the first setting that is out of range or contradicts another."""
        def need(ok: bool, name: str, why: str) -> None:
            if not ok:
                raise SettingError(name, getattr(self, name), why)

        for name in ("max_new_tokens", "max_length"):
            value = getattr(self, name)
            need(value is None or (is_integer(value) and value > 0), name, "must be a positive integer")
        need(is_integer(self.min_new_tokens) and self.min_new_tokens >= 0, "min_new_tokens",
             "must be a non-negative integer")
        need(isinstance(self.do_sample, bool), "do_sample", "must be true or false")
        if self.do_sample:
            need(_is_number(self.temperature) and self.temperature > 0, "temperature",
                 "must be finite and > 0 when sampling (for deterministic output use do_sample=False)")
            need(self.temperature >= MIN_DIVISOR, "temperature", f"is too small: the logits divided by it can "
                 f"overflow float32; use at least {MIN_DIVISOR:g} (for the most likely tokens use do_sample=False)")
        need(is_integer(self.top_k) and self.top_k >= 0, "top_k", "must be an integer >= 0 (0 disables it)")
        need(_is_number(self.top_p) and 0 < self.top_p <= 1, "top_p", "must be in (0, 1] (1 disables it)")
        need(self.min_p is None or (_is_number(self.min_p) and 0 <= self.min_p <= 1), "min_p", "must be in [0, 1]")
        need(_is_number(self.typical_p) and 0 < self.typical_p <= 1, "typical_p", "must be in (0, 1] (1 disables it)")
        need(_is_number(self.repetition_penalty) and self.repetition_penalty > 0, "repetition_penalty",
             "must be finite and > 0 (1 disables it, > 1 discourages repeats)")
        need(self.repetition_penalty >= MIN_DIVISOR, "repetition_penalty", f"is too small: the logits divided by "
             f"it can overflow float32; use at least {MIN_DIVISOR:g}")
        need(is_integer(self.no_repeat_ngram_size) and self.no_repeat_ngram_size >= 0, "no_repeat_ngram_size",
             "must be an integer >= 0 (0 disables it)")
        need(is_integer(self.num_beams) and self.num_beams >= 1, "num_beams", "must be an integer >= 1")
        need(_is_number(self.length_penalty), "length_penalty", "must be a finite number")
        # Beam search divides float32 scores by new_length ** length_penalty, for every length up to the longest
        # (an upper bound here: the prompt's length is not known yet); past float32's range that is a division by
        # inf or 0, and past a Python float's, an OverflowError.
        longest = self.max_new_tokens or self.max_length or DEFAULT_NEW_TOKENS
        if self.num_beams > 1 and longest > 1:
            limit = math.floor(math.log(FLOAT32_MAX) / math.log(longest) * 100) / 100  # rounded down, so safe as shown
            need(abs(self.length_penalty) <= limit, "length_penalty", f"length ** length_penalty leaves float32's "
                 f"range for hypotheses of up to {longest} new tokens; use a value between -{limit:g} and {limit:g}")
        # `1 in (True, False)` is true in Python, so integers are refused explicitly
        need(self.early_stopping in (True, False, "never") and not is_integer(self.early_stopping),
             "early_stopping", "must be True, False or 'never'")
        need(is_integer(self.num_return_sequences) and self.num_return_sequences >= 1, "num_return_sequences",
             "must be an integer >= 1")
        if self.num_beams == 1:
            need(self.num_return_sequences == 1 or self.do_sample, "num_return_sequences",
                 "greedy search gives one sequence per prompt; set do_sample=True or num_beams > 1")
        else:
            need(self.num_return_sequences <= self.num_beams, "num_return_sequences",
                 f"beam search can return at most num_beams={self.num_beams} sequences")
            need(not self.sliding_window, "sliding_window", "is not supported with beam search (num_beams > 1)")
        need(all(is_integer(i) and i >= 0 for i in self.eos_ids) and (self.eos_token_id != []), "eos_token_id",
             "must be a token id >= 0, a non-empty list of them, or None")
        need(self.pad_token_id is None or (is_integer(self.pad_token_id) and self.pad_token_id >= 0), "pad_token_id",
             "must be a token id >= 0 or None")
        need(self.stop_strings is None or (isinstance(self.stop_strings, (list, tuple)) and len(self.stop_strings) > 0
                                           and all(isinstance(s, str) and s for s in self.stop_strings)),
             "stop_strings", "must be a non-empty list of non-empty strings")
        need(isinstance(self.sliding_window, bool), "sliding_window", "must be true or false")


def _is_number(value: Any) -> bool:
    # inf and nan are floats, but no setting means anything at them (a temperature of inf turns -inf logits to nan)
    return is_real(value) and math.isfinite(value)


# The decoding strategies of the classic recipe ("How to generate text", Hugging Face, 2020), by name. Each is a set of
# overrides on a base (the defaults above, or a checkpoint's settings); flags given next to a preset win over it. A
# preset sets everything that makes it the strategy it is named after, so that a checkpoint's own num_beams or top_p
# does not turn "top-k" into beam sampling with a nucleus; temperature, penalties and lengths stay the base's.
_NO_FILTER = dict(top_k=0, top_p=1.0, typical_p=1.0, min_p=None)
STRATEGIES: dict[str, dict[str, Any]] = {
    "greedy": dict(do_sample=False, num_beams=1, num_return_sequences=1),
    "beam": dict(do_sample=False, num_beams=5, no_repeat_ngram_size=2, early_stopping=True),
    "sample": dict(do_sample=True, num_beams=1, **_NO_FILTER),
    "top-k": dict(do_sample=True, num_beams=1, **{**_NO_FILTER, "top_k": 50}),
    "top-p": dict(do_sample=True, num_beams=1, **{**_NO_FILTER, "top_p": 0.92}),
}
SAMPLING_SETTINGS = ("temperature", "top_k", "top_p", "min_p", "typical_p")  # used only when do_sample is on


def describe_strategy(name: str) -> str:
    """The settings that make preset `name` what it is, as arguments: "do_sample=True, top_k=0" (those it sets
    only to switch off what is off by default are left out)."""
    off = {**_NO_FILTER, "num_beams": 1, "num_return_sequences": 1}
    # But top_k=0 is shown: top_k defaults to 50 (in transformers too), so "do_sample=True" alone reads as top-k.
    del off["top_k"]
    return ", ".join(f"{key}={value}" for key, value in STRATEGIES[name].items()
                     if key not in off or value != off[key])
