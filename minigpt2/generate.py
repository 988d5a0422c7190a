"""`generate()`: continue prompts token by token, with transformers' arguments and results.

One decoding step, for every strategy:

    tokens so far --model + KV cache--> next-token logits (rows, vocab)
                  --logits processors--> scores           (penalties, then warpers when sampling)
                  --choice-->            next token(s)    (argmax | multinomial | best beam continuations)
                  --stopping rules-->    finished rows    (end-of-sequence id, stop strings, length)

The prompt is run once (the "prefill"), filling the KV cache; every later step feeds only the newest token, so a step
costs one pass over the weights whatever the length. The prefill runs the model's forward; the steps run the same
arithmetic without modules (decode_step.py), which a CPU runs 10-15% faster. Rows that continue the same prompt
(beams, or several samples per prompt) share one prefill: the prompt's keys/values are copied into each of them.

Batches of prompts of different lengths are left-padded, with an attention mask of 0 on the padding: every prompt
then ends in the last column, new tokens are appended to all rows at once, and positions are counted from the mask
so that each prompt is continued exactly as it would be alone. (With sliding_window, up to the window's first
slide: the rows share one window of columns, so a row with padding in it keeps fewer of its own tokens than it
would alone; continue such prompts one at a time where that matters.) A row that finishes early is filled with
`pad_token_id` while the others go on.

Where the result differs from transformers' (5.24), it is in tokens that carry no text, and on purpose:
- What fills a finished row: always `pad_token_id` (else the first eos id) here. transformers' beam search fills
  with the first eos id when pad_token_id is 0 (a truthiness test) and with -1 when there is no eos id; and with
  stop strings but no eos id, its greedy search and sampling go on generating in rows that have stopped.
- Hypotheses beyond the real ones: when fewer continuations are possible than `num_return_sequences` asks for (a
  vocabulary smaller than the beams, or processors that ban nearly everything), the extra slots are filled from
  beams that never started, whose scores tie at the "impossible" value; the two libraries break that tie
  differently, so those meaningless hypotheses may differ.

Greedy search and sampling share `_decode`; beam search is `_beam_search`. `stream_generate` turns the tokens of a
single sequence into text as they come, holding back what might be the start of a stop string.
"""

from __future__ import annotations

import codecs
import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .decode_step import Step, decoding_step
from .errors import ConfigError
from .generation_config import GenerationConfig, SettingError
from .kv_cache import KVCache
from .logits_process import Processor, apply_processors, build_processors
from .prepack import prepacked, use_decoding_layout
from .tokenizer import Tokenizer

# "Impossible" in beam bookkeeping: finite, unlike -inf, so that sums stay finite and a softmax never sees a row of
# -inf only (that would be NaN); any real log-probability sum is far above it. transformers uses the same value.
NEG = -1.0e9
# Packing the weights costs about as much as 5-10 steps of several rows save (gpt2: 0.15 s against 20-40 ms a step).
MIN_PACKED_STEPS = 8


def generate(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
             generation_config: GenerationConfig | None = None, generator: torch.Generator | None = None,
             streamer: Callable[[torch.Tensor], None] | None = None, tokenizer: Tokenizer | None = None,
             **settings) -> torch.Tensor:
    """Continue `input_ids` (B, T); return the full sequences (B * num_return_sequences, T + new), prompt included.

    attention_mask: (B, T), 0 on left padding. Without it, positions equal to an explicitly given pad_token_id
        (that is not also the end-of-sequence id) are taken as padding, as transformers does.
    generation_config, **settings: see `GenerationConfig`; keyword settings override the config's fields. Without
        a generation_config, the model's own (`model.generation_config`, a checkpoint's generation_config.json) is
        the base, as in transformers.
    generator: the random generator for sampling (default: torch's global one, so torch.manual_seed applies).
    streamer: called after every step with that step's new tokens, (rows,); in beam search these are the running
        beams' newest tokens, which may still be dropped. A transformers streamer (TextStreamer and the like: an
        object with put and end) gets what transformers gives it: put(prompt), put(tokens) each step, end().
    tokenizer: decodes tokens for `stop_strings` (default: GPT-2's).

    Rows that end before the longest one are filled with pad_token_id (default: the first eos_token_id).

    Decoding runs under torch.inference_mode (the streamer too), which skips autograd's bookkeeping on every small
    op of a step; the returned tensor is an ordinary one. On a CPU the fp32 weights are held the way decoding
    multiplies them fastest (`prepack.py`): for one row, the first call lays them out input-major in place (same
    values, new strides, kept afterwards); for several rows (beams, a batch, several samples) and at least
    MIN_PACKED_STEPS new tokens, enough steps to repay the packing, they are packed for that many rows for the
    length of the call (a copy about the size of the weights, freed on return), from nn.Linear's own layout, to
    which the first such call returns them in place. Several rows for fewer steps use the weights as they are.
    """
    hf_streamer = streamer if callable(getattr(streamer, "put", None)) else None  # transformers' protocol
    if hf_streamer is not None:
        def streamer(tokens: torch.Tensor) -> None:
            hf_streamer.put(tokens.cpu())
    elif streamer is not None and not callable(streamer):
        raise ConfigError(f"streamer must be a callable that takes each step's tokens, or a transformers streamer "
                          f"(with put and end); got {type(streamer).__name__}")
    with torch.inference_mode():
        run = _prepare(model, input_ids, attention_mask, generation_config, settings, tokenizer)
        if hf_streamer is not None:
            if run.config.num_beams > 1:  # its text would follow beams that may be dropped
                raise ConfigError("a transformers streamer (put/end) does not take beam search, as in transformers; "
                                  "pass a callable instead, or num_beams=1")
            hf_streamer.put(input_ids.cpu())
        with _decoding_weights(run):
            if run.config.num_beams > 1:
                sequences = _beam_search(run, generator, streamer)
            else:
                for tokens in _decode(run, generator):
                    if streamer is not None:
                        streamer(tokens)
                sequences = run.sequences[:, :run.length]
    if hf_streamer is not None:
        hf_streamer.end()
    return sequences.clone()  # outside inference mode: usable anywhere, e.g. as training input


@torch.inference_mode()
def stream_generate(model: torch.nn.Module, prompt: str | torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                    generation_config: GenerationConfig | None = None, generator: torch.Generator | None = None,
                    tokenizer: Tokenizer | None = None, **settings) -> Iterator[str]:
    """Yield the continuation of one prompt as text, piece by piece, as the tokens are generated.

    prompt: text, or token ids (1, T). attention_mask: as for `generate`; a text prompt is all text (no token of it
        is taken for padding, whatever pad_token_id is). Settings as for `generate` (greedy or sampling, one
        sequence), with the same default base, the model's generation_config.
    Text is yielded in whole characters (a character split across tokens waits for its last byte). With
    stop_strings, text that could be the start of a stop string is held back until it is not, and the stream ends
    just before the first stop string; the end-of-sequence token is not shown.
    """
    tokenizer = tokenizer or Tokenizer()
    if isinstance(prompt, str):
        prompt = torch.tensor([tokenizer.encode(prompt)], dtype=torch.long, device=next(model.parameters()).device)
        attention_mask = torch.ones_like(prompt)
    run = _prepare(model, prompt, attention_mask, generation_config, settings, tokenizer)
    if run.config.num_beams > 1 or run.sequences.shape[0] != 1:
        raise ConfigError("stream_generate continues one prompt into one sequence; for num_beams > 1, several "
                          "prompts or num_return_sequences > 1 use generate()")
    # The prompt's text, without its padding (given by the mask, or taken from pad_token_id).
    real = run.mask[0, :run.prompt_length].bool() if run.mask is not None else slice(None)
    text = TextStream(tokenizer, run.config.stop_strings or [], skip_ids=run.config.eos_ids,
                      context=tokenizer.decode(prompt[0, real].tolist()))
    with _decoding_weights(run):
        for tokens in _decode(run, generator):
            piece = text.push(int(tokens[0]))
            if piece:
                yield piece
    rest = text.finish()
    if rest:
        yield rest


class TextStream:
    """Tokens in, printable text out: whole characters only, never a piece of text a stop string might claim.

    context: the text before the first token (the prompt), already shown. A stop string may begin in it, as
    generation's own check (`StopStrings`) reads the whole sequence: then the text from the first token on is its
    rest, and nothing is shown.
    """

    def __init__(self, tokenizer: Tokenizer, stop_strings: Sequence[str], skip_ids: Sequence[int] = (),
                 context: str = "") -> None:
        self.tokenizer = tokenizer
        self.stop_strings = stop_strings
        self.skip_ids = set(skip_ids)
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # keeps a split character's bytes
        self.text = context  # the context, then everything decoded
        self.shown = len(context)  # how much of `text` has been handed out (or was shown before)
        # Where a stop string may still start: in the end of the context, until text after it is shown. It must
        # end after the context, too: one that lies in the context whole never stopped generation.
        longest = max((len(stop) for stop in stop_strings), default=1)
        self.stop_from = max(0, len(context) - longest + 1)
        self.context_end = len(context)
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one token; return the text that is now safe to show (possibly empty)."""
        if self.stopped or token in self.skip_ids:
            return ""
        self.text += self.utf8.decode(self.tokenizer.decode_bytes([token]))
        return self._release(final=False)

    def finish(self) -> str:
        """The rest of the text, once no more tokens will come."""
        if self.stopped:
            return ""
        self.text += self.utf8.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        hits = [i for i in (self.text.find(stop, max(self.stop_from, self.context_end - len(stop) + 1))
                            for stop in self.stop_strings) if i >= 0]
        if hits:
            self.stopped = True
            return self.text[self.shown:max(min(hits), self.shown)]
        end = len(self.text) if final else len(self.text) - self._partial_stop_length()
        piece, self.shown = self.text[self.shown:end], end
        if piece:  # it was held back while a stop string could start in it or before it: none can now
            self.stop_from = end
        return piece

    def _partial_stop_length(self) -> int:
        """How much of the unshown text to hold back: the longest end of the text from `stop_from` that is the
        beginning of some stop string, or the part of it that is not shown yet."""
        tail = self.text[self.stop_from:]
        longest = max((k for stop in self.stop_strings for k in range(1, min(len(stop), len(tail) + 1))
                       if tail.endswith(stop[:k])), default=0)
        return min(longest, len(self.text) - self.shown)


class StopStrings:
    """Which sequences have just completed one of `stop_strings`, in transformers' sense.

    A sequence stops when a stop string ends inside its newest token (which may run past it): the token that
    completes the string is kept, and nothing after it is generated. Matching is on bytes, so a string may end in
    the middle of a token or of a multi-byte character.
    """

    def __init__(self, stop_strings: list[str], tokenizer: Tokenizer) -> None:
        self.stops = [s.encode("utf-8") for s in stop_strings]
        self.tokenizer = tokenizer
        self.window = max(len(s) for s in self.stops)  # every token is at least one byte long

    def __call__(self, sequences: torch.Tensor) -> torch.Tensor:
        """sequences (rows, T) -> (rows,) bool."""
        hits = []
        for tokens in sequences[:, -self.window:].tolist():
            tail = self.tokenizer.decode_bytes(tokens)
            newest = len(self.tokenizer.decode_bytes(tokens[-1:]))
            hits.append(any(stop in tail[max(0, len(tail) - newest - len(stop) + 1):] for stop in self.stops))
        return torch.tensor(hits, device=sequences.device)


@dataclass
class _Run:
    """Everything one generate() call decided before the first step."""

    model: torch.nn.Module
    config: GenerationConfig
    prompts: torch.Tensor               # (B, T) the prompts as given
    mask: torch.Tensor | None           # (rows, T + new) attention mask, None when nothing is padded
    sequences: torch.Tensor             # (rows, T + new) prompt then generated tokens, rows = B * rows_per_prompt
    rows_per_prompt: int
    prompt_length: int                  # T, padding included
    new_tokens: int
    processors: list[Processor]
    eos: torch.Tensor | None            # (n_eos,)
    stop_strings: StopStrings | None
    length: int = 0                     # filled length of `sequences` after decoding

    def finished(self, sequences: torch.Tensor) -> torch.Tensor:
        """(rows,) bool: which of `sequences` (rows, T) just ended by end-of-sequence id or stop string."""
        if self.eos is not None:
            done = torch.isin(sequences[:, -1], self.eos)
        else:
            done = torch.zeros(sequences.shape[0], dtype=torch.bool, device=sequences.device)
        if self.stop_strings is not None:
            done |= self.stop_strings(sequences)
        return done


def _prepare(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
             generation_config: GenerationConfig | None, settings: dict, tokenizer: Tokenizer | None) -> _Run:
    if generation_config is None:
        base = model.generation_config
    elif isinstance(generation_config, GenerationConfig):
        base = generation_config
    elif callable(getattr(generation_config, "to_dict", None)):  # transformers' own, merged as transformers does
        base = GenerationConfig.from_transformers(generation_config, model.generation_config)
    else:
        raise ConfigError(f"generation_config must be a GenerationConfig (minigpt2's or transformers'), got "
                          f"{type(generation_config).__name__}; pass settings as keyword arguments instead")
    config = GenerationConfig.from_kwargs(base, **settings)
    vocab, context = model.config.vocab_size, model.config.n_positions
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.long,
                                                                                                  torch.int):
        raise ConfigError("input_ids must be an integer tensor of shape (batch, tokens)")
    B, T = input_ids.shape
    if B == 0 or T == 0:
        raise ConfigError(f"input_ids has shape {tuple(input_ids.shape)}: the prompt is empty; give at least one "
                          "token (e.g. <|endoftext|>, id 50256, to generate from nothing)")
    input_ids = input_ids.long()
    if int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab:
        raise ConfigError(f"input_ids holds ids outside the model's vocabulary of {vocab} tokens")
    pad_ids = [] if config.pad_token_id is None else [config.pad_token_id]
    for name, ids in (("eos_token_id", config.eos_ids), ("pad_token_id", pad_ids)):
        if any(i >= vocab for i in ids):
            raise SettingError(name, getattr(config, name), f"is outside the model's vocabulary of {vocab} tokens; "
                               "pass an id below it, or None")

    attention_mask = _checked_padding_mask(input_ids, attention_mask, config)
    if config.sliding_window:
        new = config.new_tokens(T)
    else:
        check_length(config, T, context)  # first: a prompt that fills the context is named as the prompt
        # The default length stops at the context quietly, as in transformers.
        new = min(config.new_tokens(T), context - T)
    stop = StopStrings(config.stop_strings, tokenizer or Tokenizer()) if config.stop_strings else None
    rows_per_prompt = max(config.num_beams, config.num_return_sequences)
    config.check_batch(B)

    rows = B * rows_per_prompt
    sequences = torch.empty(rows, T + new, dtype=torch.long, device=input_ids.device)
    sequences[:, :T] = input_ids.repeat_interleave(rows_per_prompt, dim=0)
    mask, padding = None, None
    if attention_mask is not None:
        mask = torch.ones(rows, T + new, dtype=torch.long, device=input_ids.device)
        mask[:, :T] = attention_mask.repeat_interleave(rows_per_prompt, dim=0)
        # Left padding: the zeros before a row's first 1. A 0 after it (a masked-out token inside the prompt) is
        # still text to the repetition penalty, as in transformers.
        padding = (mask[:, :T].cumsum(1) == 0).sum(1)
    eos = torch.tensor(config.eos_ids, device=input_ids.device) if config.eos_ids else None
    processors = build_processors(config, prompt_length=T, prompt_padding=padding, device=input_ids.device)
    return _Run(model, config, input_ids, mask, sequences, rows_per_prompt, T, new, processors, eos, stop)


_WINDOW_FIX = "or set sliding_window=True to drop the oldest tokens as the text grows"


class PromptTooLongError(ConfigError):
    """The prompt alone fills the model's context, so no length setting can make room. `prompt_length` and
    `context` are kept apart so that a front end can name where the prompt came from."""

    def __init__(self, prompt_length: int, context: int) -> None:
        super().__init__(f"the prompt ({prompt_length} tokens) fills the model's context of {context} positions, "
                         f"leaving no room for new tokens; shorten the prompt, {_WINDOW_FIX}")
        self.prompt_length, self.context = prompt_length, context


def check_length(config: GenerationConfig, prompt_length: int, context: int) -> None:
    """Refuse a length that runs past the model's context (without sliding_window): PromptTooLongError when the
    prompt alone fills it, else a SettingError naming the setting that asked for too much (max_new_tokens wins over
    max_length, as in transformers), so that a caller can say where its value came from."""
    if prompt_length >= context:  # whatever length is asked for: no setting but the prompt can make room
        raise PromptTooLongError(prompt_length, context)
    if config.max_new_tokens is not None:
        total = prompt_length + config.max_new_tokens
        if total > context:
            raise SettingError("max_new_tokens", config.max_new_tokens, f"makes {total} tokens with the prompt, more "
                               f"than the model's context of {context} positions; lower it, shorten the prompt, "
                               f"{_WINDOW_FIX}")
    elif config.max_length is not None:
        if config.max_length > context:  # it counts the prompt too: too long whatever the prompt
            raise SettingError("max_length", config.max_length, f"is longer than the model's context of {context} "
                               f"positions; set max_new_tokens instead (it wins over max_length), lower it, "
                               f"{_WINDOW_FIX}")


def _decoding_weights(run: _Run) -> contextlib.AbstractContextManager:
    """How the decoding steps hold the weights (see `prepack.py`): one row reads input-major weights fastest; for
    several rows, and enough steps to repay the packing, the weights are packed for that many rows."""
    rows = run.sequences.shape[0]
    if rows >= 2 and run.new_tokens >= MIN_PACKED_STEPS and not torch.is_autocast_enabled("cpu"):
        use_decoding_layout(run.model, input_major=False)  # what packing reads, see prepack.py
        return prepacked(run.model, rows)
    if rows == 1:
        use_decoding_layout(run.model)
    return contextlib.nullcontext()


def _checked_padding_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                          config: GenerationConfig) -> torch.Tensor | None:
    """The (B, T) mask to use, or None when no position is padding. Checks that padding is on the left.

    Without a mask, pad_token_id marks the padding (unless it is also an end-of-text id), as in transformers."""
    if attention_mask is None:
        pad = config.pad_token_id
        if pad is None or pad in config.eos_ids or not bool((input_ids == pad).any()):
            return None
        ends_in_pad = (input_ids[:, -1] == pad).nonzero()
        if len(ends_in_pad):
            raise ConfigError(f"prompt {int(ends_in_pad[0])} of the batch ends with pad_token_id {pad}, which marks "
                              f"padding when no attention_mask is given, and generation appends to the right; pad "
                              f"on the left, or pass an attention_mask if that token is text")
        attention_mask = (input_ids != pad).long()
    if attention_mask.shape != input_ids.shape:
        raise ConfigError(f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has "
                          f"{tuple(input_ids.shape)}")
    attention_mask = attention_mask.to(device=input_ids.device, dtype=torch.long)
    if bool((attention_mask == 1).all()):
        return None
    empty = (attention_mask.sum(1) == 0).nonzero()
    if len(empty):
        raise ConfigError(f"prompt {int(empty[0])} of the batch is empty (its attention_mask is all 0)")
    if bool((attention_mask[:, -1] == 0).any()):
        raise ConfigError("attention_mask has padding at the end of a prompt; generation appends to the right, so "
                          "pad on the left (tokenizer padding_side='left')")
    return attention_mask


def _prefill(model: torch.nn.Module, cache: KVCache, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Run the model over `ids` (rows, T) into `cache`; the next-token logits (rows, vocab) in fp32."""
    return model.head(model.hidden_states(ids, attention_mask=mask, kv_cache=cache)[:, -1]).float()


def _first_logits(run: _Run) -> tuple[KVCache, Step, torch.Tensor, int]:
    """Prefill every distinct prompt once, then copy it to the rows that continue it.

    Returns the cache, the decoding step over it (decode_step.py), the first logits and the window's start.

    Rows b*r ... b*r + r - 1 all hold prompt b, so rows 0, r, 2r, ... (a strided view) are the distinct prompts.
    """
    B, T = run.prompts.shape
    param = next(run.model.parameters())
    capacity = min(T + run.new_tokens - 1, run.model.config.n_positions)
    cache = KVCache(run.model.config, B, capacity, device=param.device, dtype=param.dtype)
    window_start = max(0, T - capacity)  # sliding window: a prompt longer than the context keeps its end
    r = run.rows_per_prompt
    mask = run.mask[::r, window_start:T] if run.mask is not None else None
    logits = _prefill(run.model, cache, run.sequences[::r, window_start:T], mask)
    if r > 1:
        cache = cache.repeat_rows(r)
        logits = logits.repeat_interleave(r, dim=0)
    return cache, decoding_step(run.model, cache), logits, window_start


def _step_logits(run: _Run, cache: KVCache, step: Step, window_start: int, length: int,
                 newest: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Feed the newest tokens (rows,), at column length - 1; return (fp32 logits (rows, vocab), the window's start).

    With sliding_window, a full cache is emptied and refilled with the newest half of the window: one re-prefill
    buys half a context of cheap steps. (Without it the context was checked up front and the cache never fills.)
    """
    if cache.length == cache.max_len:
        cache.clear()
        window_start = length - cache.max_len // 2
        mask = run.mask[:, window_start:length] if run.mask is not None else None
        return _prefill(run.model, cache, run.sequences[:, window_start:length], mask), window_start
    mask = run.mask[:, window_start:length] if run.mask is not None else None
    return step(newest, mask).float(), window_start


def _decode(run: _Run, generator: torch.Generator | None) -> Iterator[torch.Tensor]:
    """Greedy search or multinomial sampling; yields each step's tokens (rows,) and fills `run.sequences`."""
    config, T = run.config, run.prompt_length
    rows = run.sequences.shape[0]
    cache, step_fn, logits, window_start = _first_logits(run)
    can_finish = run.eos is not None or run.stop_strings is not None
    unfinished = torch.ones(rows, dtype=torch.bool, device=run.sequences.device)
    running = rows  # unfinished rows: until one finishes there is no padding to fill in
    length = T
    for step in range(run.new_tokens):
        scores = apply_processors(run.processors, run.sequences[:, :length], logits) if run.processors else logits
        if config.do_sample:
            # One multinomial call over the batch, on fp32 probabilities: the same random draws as transformers.
            # (rows, vocab) -> one draw a row (rows, 1) -> (rows,)
            tokens = torch.multinomial(F.softmax(scores, dim=-1), num_samples=1, generator=generator).squeeze(1)
        else:
            tokens = scores.max(-1).indices  # argmax (the first of equal maxima), in a vectorised pass: 3x faster
        if running < rows and config.pad_id is not None:
            # Finished rows still take a step (the batch stays one tensor), and grow padding, as in transformers.
            tokens = torch.where(unfinished, tokens, config.pad_id)
        run.sequences[:, length] = tokens
        length += 1
        run.length = length
        yield tokens
        if can_finish:
            unfinished.masked_fill_(run.finished(run.sequences[:, :length]), False)
            running = int(unfinished.sum())
            if running == 0:
                return
        if step + 1 < run.new_tokens:
            logits, window_start = _step_logits(run, cache, step_fn, window_start, length, tokens)


def _best_candidates(totals: torch.Tensor, beams: int, candidates: int, do_sample: bool,
                     generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 2 of beam search: the `candidates` best (or sampled) of the (B, beams * vocab) scores, best first, as
    (scores, flat indices into beams * vocab), each (B, candidates)."""
    B, vocab = totals.shape[0], totals.shape[1] // beams
    if do_sample:
        # (B, beams * vocab) -> (B, candidates), drawn without replacement
        flat = torch.multinomial(F.softmax(totals, dim=-1), num_samples=candidates, generator=generator)
        # Best first, as topk's are: only the first `beams` candidates may finish (step 3).
        scores, order = totals.gather(1, flat).sort(dim=-1, descending=True)
        return scores, flat.gather(1, order)
    # One topk over all beams * vocab scores, as transformers takes them, is slow on a CPU (a single long row does
    # not run in parallel); the best of each beam first, then the best of those, finds the same scores 3x faster,
    # and the same tokens unless scores tie: which of tied scores topk puts first depends on the shape of the call.
    # So the fast way looks one candidate further, and where two of those scores are equal (half-precision logits,
    # tokens sharing an embedding) the single topk decides, as in transformers.
    per_beam = min(candidates + 1, vocab)
    beam_best, beam_tokens = torch.topk(totals.view(B * beams, vocab), per_beam)  # (B * beams, per_beam) each
    # (B * beams, per_beam) -> (B, beams * per_beam): the best of all beams' bests
    best, pick = torch.topk(beam_best.view(B, beams * per_beam), min(candidates + 1, beams * per_beam))
    if bool((best[:, 1:] == best[:, :-1]).any()):
        return torch.topk(totals, candidates)
    pick = pick[:, :candidates]
    # A pick indexes beams * per_beam: its beam is pick // per_beam, its token the beam's (pick % per_beam)-th best.
    # beam_tokens (B * beams, per_beam) -> (B, beams * per_beam), lined up with the picks
    flat = pick // per_beam * vocab + beam_tokens.view(B, beams * per_beam).gather(1, pick)
    return best[:, :candidates], flat


def _beam_search(run: _Run, generator: torch.Generator | None,
                 streamer: Callable[[torch.Tensor], None] | None) -> torch.Tensor:
    """Beam search (sampled beams when do_sample), vectorised over the batch, with transformers' exact rules.

    Per prompt, `num_beams` running beams and `num_beams` slots of finished hypotheses. Each step:
      1. every beam scores every next token: running score + log p(token), processed -> (B, beams * vocab);
      2. the best `candidates` continuations are taken (or sampled, then sorted best first), twice the beams or
         more, so that enough of them do not end even if every beam's best continuation is end-of-sequence;
      3. continuations that end (eos, stop string, length) compete for the finished slots with score
         sum_logprob / new_length ** length_penalty; only those among the best `num_beams` candidates may;
      4. the best `num_beams` continuations that did not end become the running beams (the cache follows them);
      5. stop when no running beam can still beat the worst finished one (early_stopping's heuristic), when all
         slots are full and early_stopping=True, or when every continuation ends.
    The finished slots, best first, are the result.
    """
    config, T = run.config, run.prompt_length
    B, beams, max_len = run.prompts.shape[0], config.num_beams, run.prompt_length + run.new_tokens
    n_eos = run.eos.numel() if run.eos is not None else 0
    candidates = max(2, 1 + n_eos) * beams
    device = run.sequences.device
    fill = config.pad_id if config.pad_id is not None else -1

    running = torch.full((B, beams, max_len), fill, dtype=torch.long, device=device)
    running[:, :, :T] = run.sequences[:, :T].view(B, beams, T)  # (B * beams, T) -> (B, beams, T)
    # Only the first beam starts alive: identical beams would otherwise propose identical candidates.
    running_scores = torch.full((B, beams), NEG, device=device)
    running_scores[:, 0] = 0.0
    done = running.clone()                                              # finished hypotheses, best first
    done_scores = torch.full((B, beams), NEG, device=device)
    done_flags = torch.zeros(B, beams, dtype=torch.bool, device=device)
    done_lengths = torch.zeros(B, beams, dtype=torch.long, device=device)  # new tokens in each
    improvable = torch.ones(B, 1, dtype=torch.bool, device=device)
    in_top_beams = torch.arange(candidates, device=device) < beams
    batch_offset = torch.arange(B, device=device)[:, None] * beams

    cache, step_fn, logits, window_start = _first_logits(run)
    length = T
    while True:
        vocab = logits.shape[-1]
        logprobs = F.log_softmax(logits, dim=-1)
        if run.processors:
            # the processors see each beam as a row: (B, beams, length) -> (B * beams, length)
            logprobs = apply_processors(run.processors, running[:, :, :length].reshape(B * beams, length), logprobs)
        # (B * beams, vocab) -> (B, beams, vocab) + each beam's score -> (B, beams * vocab): one row per prompt
        totals = (logprobs.view(B, beams, vocab) + running_scores[:, :, None]).view(B, beams * vocab)
        cand_scores, flat = _best_candidates(totals, beams, candidates, config.do_sample, generator)
        parents, tokens = flat // vocab, flat % vocab                      # (B, candidates) each
        cand = running.gather(1, parents[:, :, None].expand(-1, -1, max_len))  # (B, candidates, max_len), a copy
        cand[:, :, length] = tokens
        # (B, candidates, length + 1) -> (B * candidates, length + 1) -> ended (B * candidates,) -> (B, candidates)
        ended = run.finished(cand[:, :, :length + 1].reshape(B * candidates, -1)).view(B, candidates)
        if length + 1 == max_len:
            ended[:] = True

        # 3. finished hypotheses: old slots and newly ended candidates compete, best `beams` kept
        # Penalties are added, not set: a candidate a processor banned (-inf) must stay below an empty slot (NEG),
        # and the additions run in transformers' order, so that float32 rounding ranks alike.
        new_length = length + 1 - T
        just_ended = ended & in_top_beams
        final_scores = cand_scores / new_length ** config.length_penalty
        if config.early_stopping is True:
            final_scores = final_scores + done_flags.all(-1, keepdim=True) * NEG
        final_scores = final_scores + ~improvable * NEG
        final_scores = final_scores + ~just_ended * NEG
        keep = torch.topk(torch.cat([done_scores, final_scores], 1), beams).indices  # (B, beams) of beams + candidates
        # (B, beams + candidates, max_len) -> (B, beams, max_len), keep expanded to (B, beams, max_len)
        done = torch.cat([done, cand], 1).gather(1, keep[:, :, None].expand(-1, -1, max_len))
        done_scores = torch.cat([done_scores, final_scores], 1).gather(1, keep)
        done_flags = torch.cat([done_flags, just_ended], 1).gather(1, keep)
        done_lengths = torch.cat([done_lengths, torch.full_like(cand_scores, new_length, dtype=torch.long)],
                                 1).gather(1, keep)

        # 4. running beams: the best continuations that did not end
        alive_scores = cand_scores + ended * NEG
        best = torch.topk(alive_scores, beams).indices
        # (B, candidates, max_len) -> (B, beams, max_len)
        running = cand.gather(1, best[:, :, None].expand(-1, -1, max_len))
        running_scores = alive_scores.gather(1, best)
        length += 1
        if streamer is not None:
            streamer(running[:, :, length - 1].reshape(-1))  # (B, beams) -> (B * beams,)

        # 5. can any running beam still beat the worst finished hypothesis? (transformers' heuristics)
        if config.early_stopping == "never" and config.length_penalty > 0:
            best_length = max_len - T  # a positive penalty rewards length: assume the longest possible
        else:
            best_length = length - T
        best_possible = running_scores[:, :1] / best_length ** config.length_penalty
        worst_done = torch.where(done_flags, done_scores.min(-1, keepdim=True).values, NEG)
        improvable &= (best_possible > worst_done).any(-1, keepdim=True)
        all_full = bool(done_flags.all()) and config.early_stopping is True
        if not bool(improvable.any()) or all_full or bool(ended.all()):
            break

        # each new beam's parent, as a row of the cache: (B, beams) + b * beams -> (B * beams,)
        cache.reorder((parents.gather(1, best) + batch_offset).view(-1), start=T)
        newest = running[:, :, length - 1].reshape(-1)  # (B, beams) -> (B * beams,)
        logits, window_start = _step_logits(run, cache, step_fn, window_start, length, newest)

    n = config.num_return_sequences
    out = done[:, :n].reshape(B * n, max_len)  # (B, n, max_len) -> (B * n, max_len)
    return out[:, :T + int(done_lengths[:, :n].max())]
