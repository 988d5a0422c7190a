"""Logits processors: small functions that reshape the next-token scores before a token is chosen.

Each processor is a plain function `f(input_ids, scores, *, setting) -> scores`: `input_ids` (B, T) is every token so
far (prompt included), `scores` (B, vocab) the next-token scores in fp32. Binding the setting with functools.partial
gives the `(input_ids, scores) -> scores` shape that `build_processors` composes. A token is ruled out by setting its
score to -inf; nothing here picks a token.

Two families, applied in transformers' order (the order matters: top-p after temperature sees the tempered
distribution; min_new_tokens before top-k keeps the end-of-sequence token out of the k):

1. Penalties and constraints, for every strategy: repetition_penalty -> no_repeat_ngram -> min_new_tokens.
2. Warpers, only when sampling: temperature -> top_k -> top_p -> min_p -> typical_p.

Greedy and sampling feed them raw logits; beam search feeds log-probabilities (log_softmax of the logits), whose
sum along a sequence is the beam score. The functions do not care which.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from .generation_config import GenerationConfig

Processor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NEG_INF = float("-inf")


def repetition_penalty(input_ids: torch.Tensor, scores: torch.Tensor, *, penalty: float,
                       prompt_padding: torch.Tensor | None = None) -> torch.Tensor:
    """CTRL's penalty (Keskar et al., 2019): make every token already in the sequence less likely.

    A positive score is divided by `penalty`, a negative one multiplied by it, so the token always loses ground
    when penalty > 1, however often it occurred. `prompt_padding` (B,) counts the left-padding positions of each
    row, which are not part of the text and so are not penalised.
    """
    ids = input_ids
    if prompt_padding is not None:
        # Send padding positions to an extra, discarded column.
        is_padding = torch.arange(ids.shape[1], device=ids.device) < prompt_padding[:, None]
        ids = ids.masked_fill(is_padding, scores.shape[-1])
    seen = torch.zeros(scores.shape[0], scores.shape[1] + 1, dtype=torch.bool, device=scores.device)
    seen.scatter_(1, ids, True)
    penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen[:, :-1], penalised, scores)


def no_repeat_ngram(input_ids: torch.Tensor, scores: torch.Tensor, *, n: int) -> torch.Tensor:
    """Forbid any token that would complete an n-gram already present in the sequence (prompt included).

    The last n - 1 tokens are the prefix of the n-gram being written; every earlier window of n tokens that starts
    with that prefix bans its last token.
    """
    length = input_ids.shape[1]
    if length < n:
        return scores
    prefix = input_ids[:, length - n + 1:]                     # (B, n - 1)
    windows = input_ids.unfold(1, n, 1)                        # (B, length - n + 1, n): every n-gram so far
    matches = (windows[..., :-1] == prefix[:, None, :]).all(-1)  # (B, windows): starts with the prefix?
    vocab = scores.shape[-1]
    banned = torch.zeros(scores.shape[0], vocab + 1, dtype=torch.bool, device=scores.device)
    banned.scatter_(1, torch.where(matches, windows[..., -1], vocab), True)  # non-matches hit the spare column
    return scores.masked_fill(banned[:, :-1], NEG_INF)


def min_new_tokens(input_ids: torch.Tensor, scores: torch.Tensor, *, prompt_length: int, minimum: int,
                   eos_ids: torch.Tensor) -> torch.Tensor:
    """Rule out the end-of-sequence token(s) until `minimum` tokens follow the (padded) prompt."""
    if input_ids.shape[1] - prompt_length >= minimum:
        return scores
    return scores.index_fill(1, eos_ids, NEG_INF)


def temperature(input_ids: torch.Tensor, scores: torch.Tensor, *, value: float) -> torch.Tensor:
    """Divide the scores by `value`: below 1 the distribution sharpens towards the top token, above 1 it flattens."""
    return scores / value


def top_k(input_ids: torch.Tensor, scores: torch.Tensor, *, k: int, min_keep: int = 1) -> torch.Tensor:
    """Keep the k highest scores (and any tied with the k-th); rule out the rest (Fan et al., 2018)."""
    k = min(max(k, min_keep), scores.shape[-1])
    kth_best = torch.topk(scores, k).values[:, -1:]
    return torch.where(scores < kth_best, NEG_INF, scores)  # one pass; masked_fill after the compare takes two


def top_p(input_ids: torch.Tensor, scores: torch.Tensor, *, p: float, min_keep: int = 1) -> torch.Tensor:
    """Nucleus sampling (Holtzman et al., 2020): keep the fewest most likely tokens whose probabilities reach `p`.

    Sorted from least to most likely, a token is dropped while the cumulative probability up to and including it
    stays within 1 - p; the `min_keep` most likely always survive.
    """
    ascending, order = _sort_finite(scores)
    cumulative = ascending.softmax(-1).cumsum(-1)
    V, kept = scores.shape[-1], ascending.shape[-1]
    near = (cumulative - (1 - p)).abs().amin(-1) <= 1e-5 if kept < V else None  # (rows,): a token at the edge
    if near is not None and bool(near.any()):
        # The softmax of a shorter row sums in another order than transformers' over the full sorted row, and may
        # round the other way by an ulp: where that could decide the edge token, take the sum over the full row,
        # ruled-out tokens first as a full sort puts them (their zeros add nothing). Elsewhere it cannot matter.
        full = scores.new_full((int(near.sum()), V), NEG_INF)
        full[:, V - kept:] = ascending[near]
        cumulative[near] = full.softmax(-1)[:, V - kept:].cumsum(-1)
    drop_sorted = cumulative <= 1 - p
    drop_sorted[:, -min_keep:] = False
    # Back to token ids: every token outside `order` was ruled out already.
    return scores.scatter(1, order, ascending.masked_fill(drop_sorted, NEG_INF))


def _sort_finite(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.sort(scores) ascending, restricted to the scores not ruled out when they are few (after top_k, say).

    Ruled-out tokens (-inf) would sort first with probability 0 and change nothing; leaving them out turns a sort
    of the whole vocabulary into a top-k of a few dozen, the costliest part of a sampling step otherwise.
    """
    kept = int((scores > NEG_INF).sum(-1).max())  # one compare; isfinite takes four passes over the scores
    if kept * 4 > scores.shape[-1]:
        return torch.sort(scores)
    values, order = torch.topk(scores, kept)  # descending
    if bool(((values[:, 1:] == values[:, :-1]) & (values[:, 1:] > NEG_INF)).any()):
        # Equal scores: sort's order among them (unspecified, but the same for the same input) decides which one a
        # nucleus edge drops, and topk's differs; only the full sort drops the same token as transformers.
        return torch.sort(scores)
    return values.flip(-1), order.flip(-1)


def min_p(input_ids: torch.Tensor, scores: torch.Tensor, *, ratio: float, min_keep: int = 1) -> torch.Tensor:
    """Drop tokens whose probability is below `ratio` times the top token's (Nguyen et al., 2024)."""
    probs = scores.softmax(-1)
    drop = probs < ratio * probs.amax(-1, keepdim=True)
    drop.scatter_(1, torch.topk(probs, min(min_keep, probs.shape[-1])).indices, False)  # the min_keep best stay
    return scores.masked_fill(drop, NEG_INF)


def typical_p(input_ids: torch.Tensor, scores: torch.Tensor, *, mass: float, min_keep: int = 1) -> torch.Tensor:
    """Locally typical sampling (Meister et al., 2022): prefer tokens whose surprise is close to the entropy.

    Tokens are ranked by |(-log p) - H|; the best-ranked are kept until their probability reaches `mass`.
    """
    logp = F.log_softmax(scores, dim=-1)
    entropy = -(logp * logp.exp()).nansum(-1, keepdim=True)
    atypicality = (-logp - entropy).abs()
    ranked, order = torch.sort(atypicality)
    cumulative = scores.gather(-1, order).softmax(-1).cumsum(-1)
    # The index of the last kept: the first whose cumulative probability reaches `mass`. Rounding can leave the total
    # just under a mass near 1, so that no token reaches it: then every token is kept (the clamp).
    last = (cumulative < mass).sum(-1, keepdim=True).clamp(max=scores.shape[-1] - 1)
    drop_sorted = ranked > ranked.gather(-1, last)
    drop_sorted[:, :min_keep] = False
    drop = torch.empty_like(drop_sorted).scatter(1, order, drop_sorted)  # back to token ids (order is a permutation)
    return scores.masked_fill(drop, NEG_INF)


def build_processors(config: GenerationConfig, *, prompt_length: int,
                     prompt_padding: torch.Tensor | None = None, device: torch.device | str = "cpu") -> list[Processor]:
    """The processors `config` switches on, in transformers' order (see the module docstring).

    prompt_length: length of the (padded) prompt, from which min_new_tokens counts.
    prompt_padding: (rows,) left-padding length of each row, or None when no row is padded.
    """
    processors: list[Processor] = []
    eos_ids = config.eos_ids
    if config.repetition_penalty != 1.0:
        processors.append(functools.partial(repetition_penalty, penalty=config.repetition_penalty,
                                            prompt_padding=prompt_padding))
    if config.no_repeat_ngram_size > 0:
        processors.append(functools.partial(no_repeat_ngram, n=config.no_repeat_ngram_size))
    if config.min_new_tokens > 0 and eos_ids:
        processors.append(functools.partial(min_new_tokens, prompt_length=prompt_length, minimum=config.min_new_tokens,
                                            eos_ids=torch.tensor(eos_ids, device=device)))
    if config.do_sample:
        # Beam sampling must leave every beam a continuation that is not end-of-sequence.
        min_keep = 1 + max(1, len(eos_ids)) if config.num_beams > 1 else 1
        if config.temperature != 1.0:
            processors.append(functools.partial(temperature, value=config.temperature))
        if config.top_k != 0:
            processors.append(functools.partial(top_k, k=config.top_k, min_keep=min_keep))
        if config.top_p < 1.0:
            processors.append(functools.partial(top_p, p=config.top_p, min_keep=min_keep))
        if config.min_p is not None:
            processors.append(functools.partial(min_p, ratio=config.min_p, min_keep=min_keep))
        if config.typical_p < 1.0:
            processors.append(functools.partial(typical_p, mass=config.typical_p, min_keep=min_keep))
    return processors


def apply_processors(processors: Sequence[Processor], input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Run `processors` one after another on `scores`."""
    for process in processors:
        scores = process(input_ids, scores)
    return scores
