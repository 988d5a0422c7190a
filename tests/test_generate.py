"""generate() against transformers' GPT2LMHeadModel.generate on the same random weights, token for token.

The checkpoints use initializer_range 0.2, so next-token distributions are peaked and float rounding never decides
an argmax, a beam ranking or a sampled token. Sampling is compared by seeding torch's global generator before each
side's call: both draw with one torch.multinomial per step on the same probabilities.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import shutil

import pytest
import torch
from transformers import AutoTokenizer, GPT2LMHeadModel
from transformers import GenerationConfig as HFGenerationConfig

from minigpt2 import GPT, ConfigError, GPTConfig, Tokenizer
from minigpt2.generate import PromptTooLongError, TextStream, stream_generate
from minigpt2.generation_config import STRATEGIES, GenerationConfig, SettingError
from minigpt2.kv_cache import KVCache

EOT = 50256


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pair(hf_checkpoint):
    path = hf_checkpoint()
    return GPT.from_pretrained(path), GPT2LMHeadModel.from_pretrained(path).eval()


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    Tokenizer().save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def prompts(seed: int, lengths=(7,)) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts of the given lengths, left-padded with EOT, and their attention mask."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.full((len(lengths), T), EOT)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, T - n:] = torch.randint(0, EOT, (n,), generator=g)
        mask[row, T - n:] = 1
    return ids, mask


def both(pair, ids, mask=None, seed=None, **settings):
    """(ours, transformers') sequences for the same call; the torch seed is reset before each side's call."""
    settings.setdefault("pad_token_id", EOT)  # transformers wants it explicit; ours would default to the first eos
    results = []
    for model in pair:
        if seed is not None:
            torch.manual_seed(seed)
        with torch.no_grad():
            results.append(model.generate(ids, attention_mask=mask, **settings))
    return results


def assert_same(pair, ids, mask=None, seed=None, **settings):
    ours, theirs = both(pair, ids, mask, seed, **settings)
    assert ours.tolist() == theirs.tolist(), settings
    return ours


def reachable_eos(pair, ids, mask=None, picks=((0, 2),), **settings):
    """End-of-sequence ids that this call will really produce: tokens it generates when nothing stops it."""
    ours, _ = pair
    out = ours.generate(ids, attention_mask=mask, eos_token_id=None, pad_token_id=EOT, **settings)
    T = ids.shape[1]
    return sorted({int(out[row, T + step]) for row, step in picks})


def reaches(sequences, prompt_length, eos, before_end=True):
    """Whether some returned sequence generated an eos id (before its last column, unless before_end is False)."""
    new = sequences[:, prompt_length:]
    return bool(torch.isin(new[:, :-1] if before_end else new, torch.tensor(eos)).any())


# --- greedy and the processors, one at a time and together -------------------------------------------------------

def test_greedy_matches_transformers(pair):
    for seed, length in ((0, 1), (1, 7), (2, 30)):
        ids, _ = prompts(seed, (length,))
        assert_same(pair, ids, max_new_tokens=24, do_sample=False)


def test_max_length_and_a_single_new_token(pair):
    ids, mask = prompts(25, (4, 9))
    assert_same(pair, ids, mask, max_length=ids.shape[1] + 5)
    assert_same(pair, ids, mask, max_length=ids.shape[1] + 5, num_beams=2)
    assert_same(pair, ids, mask, max_new_tokens=1, num_beams=3, num_return_sequences=2)
    assert_same(pair, ids, mask, max_new_tokens=1, do_sample=True, seed=0)


@pytest.mark.filterwarnings("ignore:Using the model-agnostic default")
def test_default_length_and_eos_are_transformers(pair):
    ids, _ = prompts(3)
    ours, theirs = both(pair, ids)  # no settings at all: 20 new tokens, greedy, eos 50256
    assert ours.tolist() == theirs.tolist() and ours.shape[1] == ids.shape[1] + 20


@pytest.mark.parametrize("settings", [
    dict(repetition_penalty=1.5),
    dict(repetition_penalty=0.7),
    dict(no_repeat_ngram_size=1),
    dict(no_repeat_ngram_size=2),
    dict(no_repeat_ngram_size=3),
    dict(repetition_penalty=1.3, no_repeat_ngram_size=2),
])
def test_greedy_with_processors(pair, settings):
    for seed in (4, 5):
        ids, _ = prompts(seed, (12,))
        assert_same(pair, ids, max_new_tokens=24, **settings)


def test_eos_reached_and_min_new_tokens(pair):
    ids, mask = prompts(6, (5, 9))
    eos = reachable_eos(pair, ids, mask, picks=((0, 3), (1, 6)), max_new_tokens=12)
    out = assert_same(pair, ids, mask, max_new_tokens=12, eos_token_id=eos)
    assert reaches(out, ids.shape[1], eos)
    out = assert_same(pair, ids, mask, max_new_tokens=12, eos_token_id=eos, min_new_tokens=8)
    assert not torch.isin(out[:, ids.shape[1]:ids.shape[1] + 8], torch.tensor(eos)).any()
    assert_same(pair, ids, mask, max_new_tokens=12, eos_token_id=eos[0], pad_token_id=17)


def test_generation_stops_when_every_row_has_ended(pair):
    ids, _ = prompts(7)
    eos = reachable_eos(pair, ids, picks=((0, 0),))
    out = assert_same(pair, ids, max_new_tokens=30, eos_token_id=eos)
    assert out.shape[1] == ids.shape[1] + 1


# --- sampling: every warper, alone and combined, same torch seed -> same tokens --------------------------------------

@pytest.mark.parametrize("settings", [
    dict(),                                  # transformers' default top_k=50
    dict(top_k=0),                           # pure sampling
    dict(temperature=0.6, top_k=0),
    dict(temperature=1.8),
    dict(top_k=5),
    dict(top_p=0.8, top_k=0),
    dict(temperature=0.8, top_p=0.9),         # top-p over transformers' default top-k: sorts the 50 survivors only
    dict(min_p=0.1, top_k=0),
    dict(typical_p=0.7, top_k=0),
    dict(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05, typical_p=0.95, repetition_penalty=1.2,
         no_repeat_ngram_size=2),
])
def test_seeded_sampling_matches_transformers(pair, settings):
    ids, mask = prompts(8, (4, 10))
    for seed in (0, 1):
        assert_same(pair, ids, mask, seed=seed, do_sample=True, max_new_tokens=16, **settings)


def test_sampling_num_return_sequences_and_eos(pair):
    ids, mask = prompts(9, (6, 3))
    eos = reachable_eos(pair, ids, mask, picks=((0, 1), (1, 2)), max_new_tokens=10)
    for seed in (2, 3):
        assert_same(pair, ids, mask, seed=seed, do_sample=True, num_return_sequences=3, max_new_tokens=10, top_k=0,
                    temperature=0.5, eos_token_id=eos)


def test_generator_makes_sampling_reproducible(pair):
    ours, _ = pair
    ids, _ = prompts(10)
    runs = [ours.generate(ids, do_sample=True, top_k=0, max_new_tokens=12, generator=torch.Generator().manual_seed(5))
            for _ in range(2)]
    torch.manual_seed(5)
    assert runs[0].tolist() == runs[1].tolist() == ours.generate(ids, do_sample=True, top_k=0,
                                                                max_new_tokens=12).tolist()


def test_generate_leaves_an_ordinary_trainable_model():
    """Decoding runs in inference mode, re-lays CPU weights out (one row) and packs them (several rows): none of
    this may leak into later training."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=32))
    untouched = copy.deepcopy(model)
    prompt, ids = torch.tensor([[1, 2, 3]]), dict(eos_token_id=None, pad_token_id=0)
    model.generate(prompt, max_new_tokens=5, **ids)
    assert not model.lm_head.weight.is_contiguous() and model.lm_head.weight.t().is_contiguous()  # input-major
    out = model.generate(prompt, num_beams=3, max_new_tokens=10, **ids)
    assert model.lm_head.weight.is_contiguous()  # packing reads nn.Linear's layout: the weights went back to it
    assert not any("forward" in vars(m) for m in model.modules())  # every layer's own forward is back
    assert not out.is_inference() and not any(p.is_inference() for p in model.parameters())
    for (name, p), q in zip(model.named_parameters(), untouched.parameters()):
        assert torch.equal(p, q), name  # same values, whatever the strides
    for m in (model, untouched):
        m.train()
        torch.manual_seed(1)  # the same dropout masks
        m.loss(out).backward()  # would raise on an inference tensor
    for (name, p), q in zip(model.named_parameters(), untouched.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("k", [0, 5, 50])
def test_warpers_equal_transformers_on_tied_scores(k):
    """Each sampling warper against transformers' own on scores with many exact ties (rounded to halves), after
    top_k or not: which of equal tokens a nucleus edge drops must agree too, not only the untied cases."""
    from transformers.generation import logits_process as hf

    from minigpt2 import logits_process as ours

    g = torch.Generator().manual_seed(k)
    for trial in range(30):
        scores = (torch.randn(3, 1000, generator=g) * 6).round() / 2
        ids = torch.randint(0, 1000, (3, 7), generator=g)
        keep = 1 + trial % 3
        if k:
            scores = ours.top_k(ids, scores, k=k, min_keep=keep)
            assert torch.equal(scores, hf.TopKLogitsWarper(k, min_tokens_to_keep=keep)(ids, scores.clone()))
        for mine, theirs in [
            (lambda s: ours.top_p(ids, s, p=0.7, min_keep=keep), hf.TopPLogitsWarper(0.7, min_tokens_to_keep=keep)),
            (lambda s: ours.min_p(ids, s, ratio=0.2, min_keep=keep), hf.MinPLogitsWarper(0.2, min_tokens_to_keep=keep)),
            (lambda s: ours.typical_p(ids, s, mass=0.8, min_keep=keep),
             hf.TypicalLogitsWarper(0.8, min_tokens_to_keep=keep)),
            (lambda s: ours.repetition_penalty(ids, s, penalty=1.3), hf.RepetitionPenaltyLogitsProcessor(1.3)),
        ]:
            assert torch.equal(mine(scores.clone()), theirs(ids, scores.clone())), (trial, theirs)


def test_top_p_after_top_k_equals_transformers_at_the_exact_edge_of_the_nucleus():
    """p chosen so that 1 - p is exactly one of transformers' own cumulative probabilities, the case where the
    rounding of the softmax's sum decides whether the edge token is kept: after top_k, over GPT-2's vocabulary
    size. Computing the softmax over the kept scores alone (a shorter sum) disagreed in several of these rows."""
    from transformers.generation import logits_process as hf

    from minigpt2 import logits_process as ours

    g = torch.Generator().manual_seed(0)
    V, rows = 50257, 1000
    scores = torch.randn(rows, V, generator=g) * 3
    ks = torch.randint(2, 200, (rows,), generator=g)
    disagree = 0
    for row in range(rows):
        row_scores = hf.TopKLogitsWarper(int(ks[row]))(None, scores[row:row + 1].clone())
        cumulative = row_scores.sort().values.softmax(-1).cumsum(-1)  # transformers' nucleus arithmetic
        edge = V - 1 - int(torch.randint(1, int(ks[row]), (1,), generator=g))
        p = 1 - float(cumulative[0, edge])
        theirs = hf.TopPLogitsWarper(p)(None, row_scores.clone())
        disagree += not torch.equal(ours.top_p(None, row_scores.clone(), p=p), theirs)
    assert disagree == 0


# --- beam search --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_beams", [2, 4])
@pytest.mark.parametrize("early_stopping", [True, False, "never"])
@pytest.mark.parametrize("length_penalty", [-1.0, 0.0, 1.0, 2.0])
def test_beam_search_matches_transformers(pair, num_beams, early_stopping, length_penalty):
    ids, mask = prompts(11, (6, 9))
    settings = dict(num_beams=num_beams, early_stopping=early_stopping, length_penalty=length_penalty,
                    max_new_tokens=10, num_return_sequences=num_beams)
    eos = reachable_eos(pair, ids, mask, picks=((0, 1), (0, 7), (num_beams - 1, 6), (num_beams, 8)), **settings)
    out = assert_same(pair, ids, mask, eos_token_id=eos, **settings)
    if length_penalty <= 1 or early_stopping is True:
        # (A strong length reward can let full-length hypotheses beat every one that ended: nothing to check then.)
        assert reaches(out, ids.shape[1], eos, before_end=length_penalty <= 1)


@pytest.mark.parametrize("settings", [
    dict(num_beams=3, num_return_sequences=1),
    dict(num_beams=5, num_return_sequences=2, no_repeat_ngram_size=2, repetition_penalty=1.3),
    dict(num_beams=4, min_new_tokens=6),
    dict(num_beams=3, eos_token_id=None, max_new_tokens=7),
])
def test_beam_search_variants(pair, settings):
    ids, mask = prompts(12, (8, 5, 11))
    settings = {"max_new_tokens": 12, **settings}
    if "eos_token_id" not in settings:
        settings["eos_token_id"] = reachable_eos(pair, ids, mask, picks=((0, 2), (1, 4)),
                                                 **{k: v for k, v in settings.items() if k != "min_new_tokens"})
    assert_same(pair, ids, mask, **settings)


def test_beam_search_with_more_candidates_than_the_vocabulary_has(hf_checkpoint):
    """12 beams keep 24 candidates a step, more than one beam's 16 tokens: the per-beam top-k must take them all."""
    path = hf_checkpoint(n_layer=1, n_head=2, n_embd=32, vocab_size=16, n_positions=32)
    pair = GPT.from_pretrained(path), GPT2LMHeadModel.from_pretrained(path).eval()
    assert_same(pair, torch.tensor([[1, 2, 3]]), num_beams=12, num_return_sequences=3, max_new_tokens=6,
                eos_token_id=None, pad_token_id=0)


def test_beam_search_breaks_exact_ties_as_transformers_does(tmp_path):
    """Tokens i and i + 32 share an embedding, so every step has pairs of exactly equal scores, and which of two tied
    candidates a beam takes depends on how the top scores are selected: as transformers selects them, in one topk
    over all beams' scores (a per-beam topk first ordered the ties otherwise, in most of these calls)."""
    from transformers import GPT2Config

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=48,
                                    initializer_range=0.2)).eval()
    with torch.no_grad():
        hf.transformer.wte.weight[32:] = hf.transformer.wte.weight[:32]
    hf.save_pretrained(tmp_path)
    pair = GPT.from_pretrained(tmp_path), GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    ids = torch.tensor([[12, 5], [30, 26]])
    ours, theirs = both(pair, ids, max_new_tokens=1, num_beams=2, length_penalty=-2.0, early_stopping=True,
                        eos_token_id=2, pad_token_id=36)
    assert ours.tolist() == theirs.tolist()
    g = torch.Generator().manual_seed(1)
    for beams in (2, 3, 5):
        ids = torch.randint(0, 64, (3, 4), generator=g)
        for eos in (None, 2, [2, 40]):
            assert_same(pair, ids, num_beams=beams, num_return_sequences=beams, max_new_tokens=8, eos_token_id=eos,
                        pad_token_id=36)


def test_beam_sampling_matches_transformers(pair):
    ids, mask = prompts(13, (5, 8))
    for seed in (0, 1):
        assert_same(pair, ids, mask, seed=seed, num_beams=3, do_sample=True, num_return_sequences=2,
                    max_new_tokens=10, temperature=0.7, top_k=0)


def test_beam_search_never_returns_a_banned_token(pair, hf_checkpoint):
    """With fewer allowed continuations than hypotheses to return, the missing ones are padding, not tokens a
    processor set to -inf (which once tied with the empty slots' score and were returned)."""
    ids, mask = prompts(48, (5, 8))
    for seed in (0, 1):
        out = assert_same(pair, ids, mask, seed=seed, num_beams=4, num_return_sequences=4, do_sample=True, top_k=2,
                          max_new_tokens=1)
        assert out[:, -1].view(2, 4)[:, 2:].eq(EOT).all()  # two tokens allowed per prompt: the rest is padding
    path = hf_checkpoint(n_layer=1, n_head=2, n_embd=32, vocab_size=16, n_positions=32)
    small = GPT.from_pretrained(path), GPT2LMHeadModel.from_pretrained(path).eval()
    out = assert_same(small, torch.arange(14)[None], num_beams=4, num_return_sequences=4, no_repeat_ngram_size=1,
                      max_new_tokens=1, eos_token_id=[15], pad_token_id=15)
    assert set(out[:, -1].tolist()) <= {14, 15}  # every prompt token is banned by no_repeat_ngram_size=1


# --- batches, the cache, the context -------------------------------------------------------------------------------

@pytest.mark.parametrize("settings", [dict(), dict(num_beams=3), dict(repetition_penalty=1.4, no_repeat_ngram_size=2)])
def test_left_padded_batch_equals_each_prompt_alone(pair, settings):
    ours, _ = pair
    lengths = (3, 11, 7)
    ids, mask = prompts(14, lengths)
    eos = reachable_eos(pair, ids, mask, picks=((0, 3),), max_new_tokens=12, **settings)
    settings = dict(max_new_tokens=12, eos_token_id=eos, **settings)
    batch = assert_same(pair, ids, mask, **settings)
    T = ids.shape[1]
    for row, n in enumerate(lengths):
        alone = ours.generate(ids[row:row + 1, T - n:], **settings)[0].tolist()
        padded = batch[row, T - n:].tolist()
        assert padded[:len(alone)] == alone
        assert all(t == EOT for t in padded[len(alone):])


def test_mask_inferred_from_pad_token_id_like_transformers(pair):
    ids, _ = prompts(15, (4, 9))
    pad = 11
    ids[ids == EOT] = pad
    assert_same(pair, ids, max_new_tokens=8, pad_token_id=pad)


def test_transformers_style_arguments_are_taken_as_transformers_takes_them(pair, hf_tokenizer, capsys):
    """What a caller of transformers' generate() passes: its GenerationConfig object (merged over the model's own
    settings), settings that change no token here (use_cache, bos_token_id, output_scores=False), None for a
    sampling setting (transformers reads it as off), eos ids as a tensor, and its TextStreamer. Each was an error:
    a TypeError from dataclasses, 'unknown generation setting', 'must be an integer', 'not callable'."""
    from transformers import TextStreamer

    import minigpt2

    assert minigpt2.GenerationConfig is GenerationConfig  # the docstrings' name, importable from the package
    ours, ref = pair
    ids, _ = prompts(23, (5,))
    config = HFGenerationConfig(max_new_tokens=7, repetition_penalty=1.3)
    with torch.no_grad():
        theirs = ref.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    assert ours.generate(ids, generation_config=config).tolist() == theirs.tolist()
    plain = ours.generate(ids, max_new_tokens=4)
    inert = ours.generate(ids, max_new_tokens=4, use_cache=False, bos_token_id=EOT, output_scores=False,
                          min_length=0, eos_token_id=torch.tensor([EOT]))
    assert torch.equal(inert, plain)
    for name in ("top_k", "temperature", "top_p"):
        assert_same(pair, ids, seed=3, max_new_tokens=8, do_sample=True, **{name: None})
    for settings, message in [(dict(output_scores=True), "output_scores=True: minigpt2's generate() returns the "
                                                         "sequences only"),
                              (dict(min_length=5), "min_length=5: is not supported by minigpt2's generate()")]:
        with pytest.raises(SettingError, match=f"^{re.escape(message)}"):
            ours.generate(ids, max_new_tokens=4, **settings)
    with pytest.raises(ConfigError, match=r"^generation_config must be a GenerationConfig \(minigpt2's or "
                                          r"transformers'\), got dict; pass settings as keyword arguments instead$"):
        ours.generate(ids, generation_config={"max_new_tokens": 4})

    printed = []
    for model in pair:
        capsys.readouterr()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, pad_token_id=EOT,
                           streamer=TextStreamer(hf_tokenizer))
        printed.append(capsys.readouterr().out)
    assert printed[0] == printed[1] and len(printed[0]) > 10
    with pytest.raises(ConfigError, match="does not take beam search"):
        ours.generate(ids, max_new_tokens=3, num_beams=2, streamer=TextStreamer(hf_tokenizer))
    with pytest.raises(ConfigError, match="^streamer must be a callable"):
        ours.generate(ids, max_new_tokens=3, streamer="print")


def test_a_prompt_ending_in_the_pad_token_needs_a_mask(pair):
    """Without an attention_mask, pad_token_id marks padding; a prompt that ends with it is refused, naming the
    fix, where transformers warns about right padding and generates after a masked-out last token. With a mask
    that says the token is text, both generate the same."""
    ours, _ = pair
    ids, _ = prompts(16, (6, 6))
    ids[1, -1] = 11
    with pytest.raises(ConfigError, match=r"^prompt 1 of the batch ends with pad_token_id 11, which marks padding "
                                          r"when no attention_mask is given.*pass an attention_mask if that token "
                                          r"is text$"):
        ours.generate(ids, max_new_tokens=4, pad_token_id=11)
    assert_same(pair, ids, torch.ones_like(ids), max_new_tokens=4, pad_token_id=11)


@pytest.mark.parametrize(("mask", "message"), [
    (torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]), r"^attention_mask has padding at the end of a prompt; .*pad on the "
                                                  r"left \(tokenizer padding_side='left'\)$"),
    (torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]]), r"^prompt 1 of the batch is empty \(its attention_mask is all 0\)$"),
    (torch.ones(2, 3, dtype=torch.long), r"^attention_mask has shape \(2, 3\) but input_ids has \(2, 4\)$"),
])
def test_masks_that_cannot_be_generated_from_are_refused(pair, mask, message):
    with pytest.raises(ConfigError, match=message):
        pair[0].generate(torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]]), attention_mask=mask, max_new_tokens=2)


def test_repetition_penalty_counts_only_leading_zeros_of_the_mask_as_padding(hf_checkpoint):
    """A 0 inside a prompt masks that token from attention, but the tokens before it are still text that
    transformers penalises: only the zeros before a row's first 1 are padding. (16 tokens: each prompt holds
    several of the likely next ones, so penalising one more or one fewer changes the output.)"""
    path = hf_checkpoint(n_layer=1, n_head=2, n_embd=32, vocab_size=16, n_positions=32)
    pair = GPT.from_pretrained(path), GPT2LMHeadModel.from_pretrained(path).eval()
    ids = torch.randint(0, 16, (6, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    for row in range(6):
        mask[row, 1:2 + row % 3] = 0  # holes after a first real token
    assert_same(pair, ids, mask, max_new_tokens=6, repetition_penalty=3.0, eos_token_id=None, pad_token_id=0)


def test_cached_steps_equal_uncached_logits_with_beam_reordering(pair):
    ours, _ = pair
    ids, mask = prompts(16, (5, 9, 9))
    rows, T = ids.shape
    cache = KVCache(ours.config, rows, T + 6)
    extra = torch.randint(0, EOT, (rows, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours(ids, attention_mask=mask, kv_cache=cache)
        seqs, masks = ids, mask
        for step, order in enumerate(([0, 1, 2], [1, 0, 2], [2, 2, 0], [0, 1, 1], [1, 2, 0], [0, 0, 0])):
            order = torch.tensor(order)
            cache.reorder(order)  # includes swaps and one row copied to several
            seqs, masks = torch.cat([seqs[order], extra[:, step:step + 1]], 1), torch.cat([masks[order],
                                                                                           torch.ones(rows, 1)], 1)
            cached = ours(extra[:, step:step + 1], attention_mask=masks, kv_cache=cache)[:, -1]
            full = ours(seqs, attention_mask=masks)[:, -1]
            assert ((cached - full).abs().max() / full.abs().max()).item() <= 1e-5


def test_context_overflow_is_a_clear_error(pair):
    ours, _ = pair
    n_positions = ours.config.n_positions
    ids, _ = prompts(17, (n_positions - 10,))
    with pytest.raises(ConfigError, match="max_new_tokens.*sliding_window"):
        ours.generate(ids, max_new_tokens=11)
    assert ours.generate(ids, max_new_tokens=10, eos_token_id=None).shape[1] == n_positions
    # Without an explicit length, the default 20 tokens stop at the context, as in transformers.
    assert ours.generate(ids, eos_token_id=None).shape[1] == n_positions
    with pytest.raises(ConfigError, match="sliding_window"):
        ours.generate(ids, max_new_tokens=11, num_beams=2, sliding_window=True)
    # A prompt that fills the context is named as the prompt, whatever length is asked for: lowering max_new_tokens
    # cannot make room (the message said to).
    full, _ = prompts(18, (n_positions,))
    for length in (dict(), dict(max_new_tokens=3), dict(max_length=n_positions)):
        with pytest.raises(PromptTooLongError, match=rf"^the prompt \({n_positions} tokens\) fills the model's "
                                                     rf"context of {n_positions} positions, leaving no room for new "
                                                     r"tokens; shorten the prompt, or set sliding_window=True") as exc:
            ours.generate(full, **length)
        # What the front ends rephrase it from, naming where the prompt came from.
        assert (exc.value.prompt_length, exc.value.context) == (n_positions, n_positions)


def test_max_length_past_the_context_is_refused_as_itself_and_max_new_tokens_wins_over_it(pair, hf_checkpoint,
                                                                                           tmp_path):
    """A checkpoint's max_length longer than the context is named as max_length, not as the max_new_tokens it
    implies; a max_new_tokens given to generate() wins over it, as in transformers."""
    n_positions = pair[0].config.n_positions
    ids, _ = prompts(34)
    path = checkpoint_with(hf_checkpoint(), tmp_path, max_length=n_positions + 1)
    with pytest.raises(SettingError, match=f"^max_length={n_positions + 1}: is longer than the model's context of "
                                           f"{n_positions} positions; set max_new_tokens instead") as raised:
        GPT.from_pretrained(path).generate(ids)
    assert raised.value.name == "max_length"
    ours, theirs = generate_both(path, ids, max_new_tokens=4)
    assert ours.tolist() == theirs.tolist() and ours.shape[1] == ids.shape[1] + 4


def test_sliding_window_predicts_each_token_from_its_window(pair):
    ours, _ = pair
    n = ours.config.n_positions
    ids, _ = prompts(18, (n - 28,))
    out = ours.generate(ids, max_new_tokens=60, eos_token_id=None, sliding_window=True)
    assert out.shape[1] == n - 28 + 60
    with torch.no_grad():
        for column in range(ids.shape[1], out.shape[1]):
            # Up to a full window the context is everything; then, each time the window is full, it restarts with
            # its newest half and grows again: every n // 2 + 1 tokens.
            period = n // 2 + 1
            start = 0 if column <= n else n + 1 + (column - n - 1) // period * period - n // 2
            logits = ours(out[:, start:column])[0, -1]
            assert int(logits.argmax()) == int(out[0, column]), column


def test_sliding_window_accepts_a_prompt_longer_than_the_context(pair):
    """The prompt keeps its newest n_positions tokens; from then on each token comes from transformers' argmax over
    the window of the sliding rule, across two restarts of the window."""
    ours, theirs = pair
    n = ours.config.n_positions
    ids, _ = prompts(19, (n + 5,))
    out = ours.generate(ids, max_new_tokens=n // 2 + 8, eos_token_id=None, sliding_window=True)
    assert out.shape[1] == ids.shape[1] + n // 2 + 8 and out[:, :ids.shape[1]].tolist() == ids.tolist()
    start = ids.shape[1] - n  # the first token sees the prompt's last n tokens
    with torch.no_grad():
        for column in range(ids.shape[1], out.shape[1]):
            if column - start > n:  # the window would outgrow the context: it restarts with its newest half
                start = column - n // 2
            logits = theirs(out[:, start:column]).logits[0, -1]
            assert int(logits.argmax()) == int(out[0, column]), column


# --- stop strings and streaming ------------------------------------------------------------------------------------

def test_stop_strings_match_transformers(pair, hf_tokenizer):
    ours, ref = pair
    tok = Tokenizer()
    ids, mask = prompts(20, (6, 9))
    free = ours.generate(ids, attention_mask=mask, max_new_tokens=12)
    # Stop strings cut from the text each row really generates, across a token boundary and inside a token.
    row0 = tok.decode_bytes(free[0, ids.shape[1]:].tolist())
    row1 = tok.decode_bytes(free[1, ids.shape[1]:].tolist())
    stops = [row0[len(row0) // 2 - 2:len(row0) // 2 + 1].decode("utf-8", errors="ignore") or "a",
             row1[5:7].decode("utf-8", errors="ignore") or "e"]
    ours_out = ours.generate(ids, attention_mask=mask, max_new_tokens=12, stop_strings=stops)
    with torch.no_grad():
        theirs = ref.generate(ids, attention_mask=mask, max_new_tokens=12, stop_strings=stops,
                              tokenizer=hf_tokenizer, pad_token_id=EOT)
    assert ours_out.tolist() == theirs.tolist()
    assert ours_out.shape[1] < free.shape[1]
    ours_beams = ours.generate(ids, attention_mask=mask, max_new_tokens=12, num_beams=3, stop=stops)
    with torch.no_grad():
        their_beams = ref.generate(ids, attention_mask=mask, max_new_tokens=12, num_beams=3, stop_strings=stops,
                                   tokenizer=hf_tokenizer, pad_token_id=EOT)
    assert ours_beams.tolist() == their_beams.tolist()


def test_stream_yields_the_generated_text(pair):
    ours, _ = pair
    tok = Tokenizer()
    ids, _ = prompts(21)
    full = ours.generate(ids, max_new_tokens=15, eos_token_id=None)
    pieces = list(stream_generate(ours, ids, max_new_tokens=15, eos_token_id=None))
    assert "".join(pieces) == tok.decode(full[0, ids.shape[1]:].tolist())
    assert len(pieces) > 1
    text = tok.decode(full[0, ids.shape[1]:].tolist())
    stop = text[6:9]
    streamed = "".join(stream_generate(ours, ids, max_new_tokens=15, eos_token_id=None, stop=stop))
    assert streamed == text[:text.find(stop)]
    assert "".join(stream_generate(ours, tok.decode(ids[0].tolist()), max_new_tokens=15, eos_token_id=None)) == text


def test_text_stream_holds_back_partial_stop_strings_and_characters():
    tok = Tokenizer()
    stream = TextStream(tok, ["\n\nEND"])
    pieces = [stream.push(t) for t in tok.encode("Hello\n\nEN")]
    assert "".join(pieces) == "Hello"                      # "\n\nEN" may become the stop string: held back
    assert stream.push(tok.encode("D")[0]) == ""           # it did: the stream ends before it
    assert stream.finish() == ""
    stream = TextStream(tok, ["\n\nEND"])
    assert "".join(stream.push(t) for t in tok.encode("Hi\n\nEx")) + stream.finish() == "Hi\n\nEx"
    stream = TextStream(tok, [])
    first, second = (stream.push(t) for t in tok.encode("🙂"))  # one character, two tokens
    assert (first, second) == ("", "🙂")


def test_text_stream_sees_stop_strings_that_begin_in_the_prompt():
    """Generation stops when a stop string ends in the newest token, wherever it began (StopStrings reads the
    whole sequence, as transformers' StopStringCriteria does): the shown text then ends where the prompt does."""
    tok = Tokenizer()
    stream = TextStream(tok, ["world cipher"], context="Hello world")
    assert "".join(stream.push(t) for t in tok.encode(" ci")) == ""  # may complete "world cipher": held back
    assert stream.push(tok.encode("pher")[0]) == "" and stream.finish() == ""
    stream = TextStream(tok, ["world cipher"], context="Hello world")
    assert "".join(stream.push(t) for t in tok.encode(" cinema")) == " cinema"  # it did not: shown
    # A stop string that starts in the prompt after text was shown is still found (and could start there):
    stream = TextStream(tok, ["abcd"], context="xab")
    assert stream.push(tok.encode("c")[0]) == "" and stream.push(tok.encode("d")[0]) == ""
    stream = TextStream(tok, ["END"], context="The END")  # complete in the prompt: generation never saw it end
    assert "".join(stream.push(t) for t in tok.encode(" is near")) + stream.finish() == " is near"
    stream = TextStream(tok, [".", "THE END"], context="END.")  # so too beside a longer one that may start there
    assert "".join(stream.push(t) for t in tok.encode(" more text")) + stream.finish() == " more text"


def test_streamer_callback_sees_every_token(pair):
    ours, _ = pair
    ids, mask = prompts(22, (3, 6))
    seen = []
    out = ours.generate(ids, attention_mask=mask, max_new_tokens=9, eos_token_id=None, streamer=seen.append)
    assert torch.stack(seen, 1).tolist() == out[:, ids.shape[1]:].tolist()


# --- invalid settings ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("settings", "name"), [
    (dict(do_sample=True, temperature=0.0), "temperature"),
    (dict(do_sample=True, temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(min_p=1.5), "min_p"),
    (dict(typical_p=0.0), "typical_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(no_repeat_ngram_size=-2), "no_repeat_ngram_size"),
    (dict(num_return_sequences=2), "num_return_sequences"),
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
    (dict(num_beams=0), "num_beams"),
    (dict(early_stopping="sometimes"), "early_stopping"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(min_new_tokens=-1), "min_new_tokens"),
    (dict(eos_token_id=[]), "eos_token_id"),
    (dict(eos_token_id=60000), "eos_token_id"),
    (dict(pad_token_id=-3), "pad_token_id"),
    (dict(stop_strings=[""]), "stop_strings"),
    (dict(max_length=3), "max_length"),
    (dict(temprature=0.5), "temprature"),
])
def test_invalid_settings_raise_value_error_naming_the_setting(pair, settings, name):
    ours, _ = pair
    ids, _ = prompts(23)
    with pytest.raises(ValueError, match=name):
        ours.generate(ids, **settings)


@pytest.mark.parametrize(("settings", "name"), [
    (dict(do_sample=True, temperature=1e-40), "temperature"),  # logits / temperature overflow: softmax of inf is NaN
    (dict(do_sample=True, temperature=1e-40, num_beams=3), "temperature"),
    (dict(do_sample=True, repetition_penalty=1e-40), "repetition_penalty"),  # positive logits / penalty overflow
    (dict(num_beams=3, length_penalty=1000.0, max_new_tokens=5), "length_penalty"),  # 5 ** 1000: OverflowError
    (dict(num_beams=3, length_penalty=-1000.0, max_new_tokens=5), "length_penalty"),  # 5 ** -1000 is 0 in float32
])
def test_settings_that_overflow_float32_are_refused_by_name(pair, settings, name):
    """transformers fails on these with a RuntimeError or OverflowError from deep inside generate()."""
    ours, _ = pair
    ids, _ = prompts(26)
    with pytest.raises(SettingError) as error:
        ours.generate(ids, **settings)
    assert error.value.name == name and "float32" in error.value.why


def test_the_float32_bounds_still_admit_what_works(pair):
    """Just inside the bounds generation matches transformers; length_penalty's bound follows the longest length
    (log(float32 max) / log(5) = 55.12... for 5 new tokens) and applies to beam search only, which uses it."""
    ids, _ = prompts(27)
    assert_same(pair, ids, seed=0, do_sample=True, temperature=1e-30, top_k=0, max_new_tokens=5)
    assert_same(pair, ids, num_beams=3, length_penalty=55.12, max_new_tokens=5)
    assert_same(pair, ids, num_beams=3, length_penalty=-55.12, max_new_tokens=5)
    with pytest.raises(SettingError, match="up to 5 new tokens; use a value between -55.12 and 55.12"):
        GenerationConfig.from_kwargs(num_beams=3, length_penalty=55.13, max_new_tokens=5)
    assert GenerationConfig.from_kwargs(length_penalty=1000.0, max_new_tokens=5).length_penalty == 1000.0


def test_invalid_inputs_raise_value_error(pair):
    ours, _ = pair
    with pytest.raises(ValueError, match="empty"):
        ours.generate(torch.zeros(1, 0, dtype=torch.long))
    ids, mask = prompts(24, (3, 5))
    with pytest.raises(ValueError, match="left"):
        ours.generate(ids, attention_mask=mask.flip(1))
    with pytest.raises(ValueError, match="empty"):
        ours.generate(ids, attention_mask=torch.zeros_like(mask))
    with pytest.raises(ValueError, match="vocabulary"):
        ours.generate(torch.tensor([[60000]]))


# --- the checkpoint's generation_config.json as the defaults of generate() -----------------------------------------

def checkpoint_with(source, target, **settings):
    """A copy of the checkpoint at `source` whose generation_config.json transformers writes from `settings`."""
    model = GPT2LMHeadModel.from_pretrained(source)
    model.generation_config = HFGenerationConfig(**settings)
    model.save_pretrained(target)
    return target


def generate_both(path, ids, seed=0, **overrides):
    """(ours, transformers') `model.generate(ids, **overrides)` for the checkpoint at `path`: no generation config,
    no attention mask, no pad id, so that everything not overridden comes from the checkpoint's files."""
    results = []
    for model in (GPT.from_pretrained(path), GPT2LMHeadModel.from_pretrained(path).eval()):
        torch.manual_seed(seed)
        with torch.no_grad():
            results.append(model.generate(ids, **overrides))
    return results


def eos_generated_by(pair, ids, seed=0, **settings):
    """An id transformers generates at the third step of the first row when nothing ends the sequences."""
    torch.manual_seed(seed)
    with torch.no_grad():
        free = pair[1].generate(ids, attention_mask=torch.ones_like(ids), eos_token_id=None, pad_token_id=0,
                                **settings)
    return int(free[0, ids.shape[1] + 2])


CHECKPOINT_SETTINGS = [
    dict(max_new_tokens=7, repetition_penalty=1.3),
    dict(max_new_tokens=7, do_sample=True, top_k=5),
    dict(max_length=13, do_sample=True, temperature=0.7, top_p=0.9, no_repeat_ngram_size=2),
    dict(max_new_tokens=6, num_beams=3, num_return_sequences=2, length_penalty=0.5, early_stopping=True),
    dict(max_new_tokens=6, num_beams=2, do_sample=True, top_k=10, repetition_penalty=1.3),
]


@pytest.mark.parametrize("settings", CHECKPOINT_SETTINGS)
def test_checkpoint_generation_config_is_the_default(pair, hf_checkpoint, tmp_path, settings):
    """generate(ids) with no settings decodes as the checkpoint's generation_config.json says, as transformers'."""
    ids, _ = prompts(30, (5, 5))
    eos = eos_generated_by(pair, ids, **settings)
    path = checkpoint_with(hf_checkpoint(), tmp_path, eos_token_id=eos, **settings)
    ours, theirs = generate_both(path, ids)
    assert ours.tolist() == theirs.tolist()
    assert ours.shape[1] < ids.shape[1] + 20  # not GPT-2's 20 new tokens
    if settings.get("num_beams", 1) == 1:
        assert reaches(ours, ids.shape[1], [eos], before_end=False)  # the checkpoint's eos ended a row


@pytest.mark.parametrize("overrides", [
    dict(max_new_tokens=4), dict(max_length=10), dict(do_sample=False), dict(top_k=0, temperature=0.7),
    dict(eos_token_id=None), dict(repetition_penalty=1.0), dict(num_beams=2, do_sample=False), dict(pad_token_id=5),
])
def test_keyword_settings_override_single_fields_of_the_checkpoint(pair, hf_checkpoint, tmp_path, overrides):
    ids, _ = prompts(31, (6, 6))
    settings = dict(max_new_tokens=7, do_sample=True, top_k=5, repetition_penalty=1.3)
    path = checkpoint_with(hf_checkpoint(), tmp_path, eos_token_id=eos_generated_by(pair, ids, **settings),
                           **settings)
    ours, theirs = generate_both(path, ids, seed=3, **overrides)
    assert ours.tolist() == theirs.tolist()


def test_stream_generate_starts_from_the_checkpoint_settings(pair, hf_checkpoint, tmp_path):
    ids, _ = prompts(32)
    settings = dict(max_new_tokens=9, repetition_penalty=1.3, no_repeat_ngram_size=2)
    eos = eos_generated_by(pair, ids, **settings)
    path = checkpoint_with(hf_checkpoint(), tmp_path, eos_token_id=eos, **settings)
    with torch.no_grad():
        theirs = GPT2LMHeadModel.from_pretrained(path).eval().generate(ids)[0, ids.shape[1]:].tolist()
    assert theirs[-1] == eos
    assert "".join(stream_generate(GPT.from_pretrained(path), ids)) == Tokenizer().decode(theirs[:-1])


def test_without_generation_config_json_the_config_json_settings_apply(pair, hf_checkpoint, tmp_path):
    """transformers then derives the defaults from config.json: its eos/pad ids and any generation settings that an
    old config.json lists."""
    ids, _ = prompts(33, (5, 5))
    settings = dict(max_new_tokens=7, do_sample=True, top_k=5)
    source = hf_checkpoint()
    shutil.copy(source / "model.safetensors", tmp_path)
    config = json.loads((source / "config.json").read_text())
    config.update(eos_token_id=eos_generated_by(pair, ids, **settings), **settings)
    (tmp_path / "config.json").write_text(json.dumps(config))
    ours, theirs = generate_both(tmp_path, ids)
    assert ours.tolist() == theirs.tolist() and ours.shape[1] == ids.shape[1] + 7
    assert reaches(ours, ids.shape[1], [config["eos_token_id"]])  # config.json's eos ended a row


@pytest.mark.filterwarnings("ignore:Using the model-agnostic default")
def test_small_vocabulary_model_saved_by_minigpt2_generates(tmp_path):
    """Its checkpoint has no end-of-sequence id (50256 is not in the vocabulary), so generation runs to the length."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=97, n_positions=64, initializer_range=0.2)).eval()
    model.save_pretrained(tmp_path)
    ids = torch.tensor([[1, 2, 3]])
    ours, theirs = generate_both(tmp_path, ids)
    assert ours.tolist() == theirs.tolist() and ours.shape == (1, 23)
    assert model.generate(ids).tolist() == theirs.tolist()  # the model as built carries the same defaults


def test_strategy_presets():
    """Each preset is the documented defaults (transformers', GPT-2's eos) with the settings of "How to generate
    text" (Hugging Face, 2020) for that strategy on top, and flags given with a preset win over it."""
    defaults = dict(max_new_tokens=None, max_length=None, min_new_tokens=0, do_sample=False, temperature=1.0,
                    top_k=50, top_p=1.0, min_p=None, typical_p=1.0, repetition_penalty=1.0, no_repeat_ngram_size=0,
                    num_beams=1, length_penalty=1.0, early_stopping=False, num_return_sequences=1,
                    eos_token_id=50256, pad_token_id=None, stop_strings=None, sliding_window=False)
    documented = {  # as "How to generate text" (Hugging Face, 2020) runs them
        "greedy": dict(),
        "beam": dict(num_beams=5, no_repeat_ngram_size=2, early_stopping=True),
        "sample": dict(do_sample=True, top_k=0),
        "top-k": dict(do_sample=True, top_k=50),
        "top-p": dict(do_sample=True, top_k=0, top_p=0.92),
    }
    assert list(STRATEGIES) == list(documented)
    for name, settings in documented.items():
        assert dataclasses.asdict(GenerationConfig.from_strategy(name)) == {**defaults, **settings}, name
        overridden = GenerationConfig.from_strategy(name, max_new_tokens=5, top_k=7)
        assert dataclasses.asdict(overridden) == {**defaults, **settings, "max_new_tokens": 5, "top_k": 7}, name
    with pytest.raises(ConfigError, match="strategy"):
        GenerationConfig.from_strategy("nucleus")
    # Over a checkpoint's settings, a preset is still its strategy: no beams or filters of the checkpoint's leak into
    # the sampling presets (top-k had kept num_beams=4 and top_p=0.5), greedy gives one sequence; the temperature,
    # penalties and lengths are the checkpoint's.
    checkpoint = GenerationConfig(do_sample=True, num_beams=4, top_p=0.5, typical_p=0.9, min_p=0.1, temperature=0.7,
                                  num_return_sequences=3, repetition_penalty=1.3, max_new_tokens=9)
    kept = dict(temperature=0.7, repetition_penalty=1.3, max_new_tokens=9)
    filters = dict(top_k=0, top_p=1.0, typical_p=1.0, min_p=None)
    expected = {
        "greedy": dict(do_sample=False, num_beams=1, num_return_sequences=1),
        "beam": dict(do_sample=False, num_beams=5, top_p=0.5, typical_p=0.9, min_p=0.1, num_return_sequences=3),
        "sample": dict(do_sample=True, num_beams=1, **filters, num_return_sequences=3),
        "top-k": dict(do_sample=True, num_beams=1, **{**filters, "top_k": 50}, num_return_sequences=3),
        "top-p": dict(do_sample=True, num_beams=1, **{**filters, "top_p": 0.92}, num_return_sequences=3),
    }
    for name, settings in expected.items():
        got = dataclasses.asdict(GenerationConfig.from_strategy(name, checkpoint))
        assert {key: got[key] for key in [*settings, *kept]} == {**settings, **kept}, name


@pytest.mark.parametrize("name", ["temperature", "top_p", "min_p", "typical_p", "repetition_penalty",
                                  "length_penalty"])
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_settings_are_refused_by_name(name, value):
    """inf and nan pass `> 0` checks (or none at all); each float setting refuses them, naming itself."""
    with pytest.raises(SettingError) as error:
        GenerationConfig.from_kwargs(do_sample=True, num_beams=2, **{name: value})
    bounded = name in ("top_p", "min_p", "typical_p")  # their range, (0, 1] or [0, 1], already says it
    assert error.value.name == name and ("must be in" if bounded else "finite") in error.value.why
    assert str(error.value).startswith(f"{name}={value!r}: ")
