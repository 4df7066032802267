"""Every ``generate()`` mode of transformers 5 with a bounded cache: exact, or refused before the cache stores anything.

The support matrix (``lacache.support.transformers_cells``) names these tests. The independent answers:

* **replay**: a fresh single-sequence cache of the same method fed the returned sequence (its prompt in one
  pass, then one token per pass, as ``generate`` feeds it) gives every step's logits the generate run saw, so
  each beam's score is the sum of the replay's log-probabilities of its tokens. The single-sequence host path
  is itself held to the independent reference forward (tests/oracle_forward.py) by test_cache, test_baselines,
  test_salient and test_reference_schedule. A beam whose per-sequence state (key norms, accumulated attention,
  salient pool, token index, position frame) did not follow it through ``reorder_cache`` fails here;
* **rows alone**: each row of a left-padded batch against that row run alone (its real tokens only);
* **eager**: a static cache (``static=True``) against the default (eager, host-path) cache of the same method.

Every stream is longer than the budget, so the caches compact (during the prompt already).
"""

from __future__ import annotations

import textwrap

import pytest
import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer, TextStreamer
from transformers.generation import utils as generation_utils
from transformers.generation.configuration_utils import GenerationMode

import lacache
from conftest import bundled_tokenizer_and_tiny_model, tiny_llama
from lacache import make_cache

INDEX = ("lacache", "lacache-capped", "lacache-reference", "streaming")
STATIC = INDEX + ("knorm",)
METHODS = STATIC + ("tova", "h2o", "lacache-salient", "lacache-group", "keydiff")
#: below every prompt here (lacache-group needs 41 on a 4-layer model with its pool)
BUDGET = {"lacache-group": 48}
PROMPT, NEW = 44, 20
PADDED = (44, 36)  # a left-padded batch: row 1 has 8 pads
#: generated tokens never repeat one of their sequence (see ``_prompts``)
DISTINCT = dict(no_repeat_ngram_size=1)

#: flags that select each mode transformers 5 runs from hub code (custom_generate repositories)
HUB_MODES = {
    GenerationMode.CONTRASTIVE_SEARCH: dict(penalty_alpha=0.6, top_k=4),
    GenerationMode.DOLA_GENERATION: dict(dola_layers="high"),
    GenerationMode.GROUP_BEAM_SEARCH: dict(num_beams=4, num_beam_groups=2, diversity_penalty=1.0),
    GenerationMode.CONSTRAINED_BEAM_SEARCH: dict(num_beams=2, force_words_ids=[[5]]),
}
ASSISTED = {
    "prompt_lookup_num_tokens": lambda: dict(prompt_lookup_num_tokens=3),
    "assistant_model": lambda: dict(assistant_model=tiny_llama(layers=2, seed=1)),
    "assistant_early_exit": lambda: dict(assistant_early_exit=2),
}


@pytest.fixture(scope="module")
def model():
    model = tiny_llama()
    model.generation_config.eos_token_id = None  # random weights: never stop early, so budgets matter
    model.generation_config.pad_token_id = 0
    return model


def _cells(methods, paths=("host", "padded", "static")) -> list[tuple[str, str]]:
    """(method, path) pairs; ``static`` only for the methods that have a static path (the others are refused at
    cache build: tests/test_static.py::test_static_is_refused_for_rules_without_a_static_path)."""
    return [(method, path) for method in methods for path in paths if path != "static" or method in STATIC]


def _make(method: str, model, static: bool = False):
    return make_cache(method, model, BUDGET.get(method, 24), static=static)


def _prompts(lengths, seed: int = 0) -> list[torch.Tensor]:
    """Prompts of distinct tokens. Key-norm (and the salient pool) rank slots by key norm, and a token repeated
    at another position has the same layer-0 key norm up to rounding, which a batch of another shape rounds
    otherwise: distinct tokens (and ``DISTINCT`` for the generated ones) keep the comparisons free of ties."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randperm(93, generator=g)[:n] + 3 for n in lengths]


def _inputs(path: str, seed: int = 0) -> tuple[list[torch.Tensor], dict]:
    """The prompts and generate()'s inputs: ``host`` two prompts of one length, ``padded`` left-padded."""
    if path == "host":
        prompts = _prompts((PROMPT, PROMPT), seed)
        return prompts, {"input_ids": torch.stack(prompts)}
    prompts = _prompts(PADDED, seed)
    width = max(PADDED)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):] = p
        mask[b, width - len(p):] = 1
    return prompts, {"input_ids": ids, "attention_mask": mask}


def _replay(model, method: str, prompt: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``[len(tokens), V]``: the logits before each of ``tokens``, from a fresh single-sequence cache fed ``prompt``
    in one pass and then ``tokens`` one per pass (the last one is never fed)."""
    cache = _make(method, model)
    n = len(prompt)
    with torch.no_grad():
        logits = [model(input_ids=prompt[None], cache=cache, position_ids=torch.arange(n)[None]).logits[0, -1]]
        for i, token in enumerate(tokens[:-1]):
            out = model(input_ids=token.view(1, 1), cache=cache, position_ids=torch.tensor([[n + i]]))
            logits.append(out.logits[0, -1])
    assert cache.num_slots < cache.seen, "the replay compacted"
    return torch.stack(logits).float()


def _compacted(cache) -> None:
    assert cache.num_slots <= cache.budget < cache.seen


# ----------------------------------------------------------------------------- greedy and sampling
MODES = {
    "greedy + repetition_penalty": dict(do_sample=False, repetition_penalty=1.3, **DISTINCT),
    "sample + num_return_sequences": dict(do_sample=True, num_return_sequences=2, top_k=20, temperature=0.9,
                                          **DISTINCT),
}


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("path", ["host", "padded"])
@pytest.mark.parametrize("method", METHODS)
def test_each_returned_row_is_its_sequence_replayed_alone(model, method, path, mode):
    """Greedy search and sampling (repetition penalty, several samples per prompt): every returned row's logits at
    every step are those of its own sequence replayed alone in a fresh cache."""
    prompts, inputs = _inputs(path)
    cache = _make(method, model)
    torch.manual_seed(0)
    out = model.generate(**inputs, cache=cache, max_new_tokens=NEW, min_new_tokens=NEW, output_logits=True,
                         return_dict_in_generate=True, **MODES[mode])
    assert cache.padded == (path == "padded")
    _compacted(cache)
    width = inputs["input_ids"].shape[1]
    copies = MODES[mode].get("num_return_sequences", 1)
    logits = torch.stack(out.logits, 1).float()  # [rows, steps, V]
    for row in range(out.sequences.shape[0]):
        tokens = out.sequences[row, width:]
        expected = _replay(model, method, prompts[row // copies], tokens)
        assert (logits[row] - expected).abs().max() <= 1e-4, f"row {row}"


# ----------------------------------------------------------------------------- beam search and beam sampling
BEAMS = {
    "beam_search": dict(num_beams=2, do_sample=False),
    "beam_sample": dict(num_beams=2, do_sample=True),
}
BEAM_SETTINGS = dict(num_return_sequences=2, length_penalty=0.0, early_stopping=False, output_scores=True,
                     return_dict_in_generate=True, max_new_tokens=NEW, min_new_tokens=NEW, **DISTINCT)


@pytest.mark.parametrize("mode", sorted(BEAMS))
@pytest.mark.parametrize("path", ["host", "padded"])
@pytest.mark.parametrize("method", METHODS)
def test_each_beams_score_is_its_sequence_replayed_alone(model, method, path, mode):
    """Beam search and beam sampling (``reorder_cache`` at every step): each returned beam's score (length_penalty=0:
    the sum of its tokens' log-probabilities) is what its sequence replayed alone in a fresh cache gives."""
    prompts, inputs = _inputs(path, seed=1)
    cache = _make(method, model)
    torch.manual_seed(0)
    out = model.generate(**inputs, cache=cache, **BEAMS[mode], **BEAM_SETTINGS)
    assert cache.padded == (path == "padded") and cache.batch_size == 4
    _compacted(cache)
    width = inputs["input_ids"].shape[1]
    for row in range(out.sequences.shape[0]):
        tokens = out.sequences[row, width:]
        log_probs = _replay(model, method, prompts[row // 2], tokens).log_softmax(-1)
        score = log_probs.gather(1, tokens[:, None]).sum()
        assert abs(float(score) - float(out.sequences_scores[row])) <= 1e-3, f"row {row}"


STATIC_MODES = {**BEAMS, **MODES}


@pytest.mark.parametrize("mode", sorted(STATIC_MODES))
@pytest.mark.parametrize("method", STATIC)
def test_static_generate_equals_the_eager_cache(model, method, mode):
    """``static=True`` under beam search, beam sampling, sampling with several samples and greedy search with a
    repetition penalty: the eager cache's tokens, logits and scores. A static cache reorders on the host path and moves the reordered slots (and key-norm's per-slot
    norms and token indices) back into its fixed buffers; before that fix beams went on from unreordered buffers."""
    prompts, inputs = _inputs("host", seed=2)
    settings = {**STATIC_MODES[mode], "max_new_tokens": NEW, "min_new_tokens": NEW, "output_logits": True,
                "return_dict_in_generate": True}
    if mode in BEAMS:
        settings.update(BEAM_SETTINGS)
    runs = []
    for static in (False, True):
        cache = _make(method, model, static=static)
        torch.manual_seed(0)
        runs.append((model.generate(**inputs, cache=cache, **settings), cache))
    (eager, _), (got, static) = runs
    assert static.static and static._static.compactions > 0
    assert torch.equal(got.sequences, eager.sequences)
    for a, b in zip(got.logits, eager.logits):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    if mode in BEAMS:
        assert torch.allclose(got.sequences_scores, eager.sequences_scores, atol=1e-5)
    eager_cache = runs[0][1]
    for layer in range(len(static.layers)):  # and it holds the same tokens, sequence by sequence
        for b in range(static.batch_size):
            assert torch.equal(static.token_positions(layer, b), eager_cache.token_positions(layer, b)), (layer, b)


# ----------------------------------------------------------------------------- the Cache methods generate calls
def _feed(model, cache, tokens: torch.Tensor, starts: list[int], mask: torch.Tensor | None) -> torch.Tensor:
    """Feed ``tokens`` ``[B, T]`` one column per pass at positions ``starts[b] + t``; the logits ``[B, T, V]``."""
    logits = []
    with torch.no_grad():
        for t in range(tokens.shape[1]):
            kwargs = {}
            if mask is not None:
                mask = torch.cat([mask, torch.ones(mask.shape[0], 1, dtype=mask.dtype)], 1)
                kwargs["attention_mask"] = mask
            positions = torch.tensor(starts)[:, None] + t
            out = model(input_ids=tokens[:, t : t + 1], cache=cache, position_ids=positions, **kwargs)
            logits.append(out.logits[:, -1].float())
    return torch.stack(logits, 1)


@pytest.mark.parametrize("method,path", _cells(METHODS))
def test_reorder_repeat_and_select_rows_continue_like_each_row_alone(model, method, path):
    """``batch_repeat_interleave``, ``reorder_cache`` and ``batch_select_indices`` called on a cache: every row then
    continues exactly as its prompt alone, even copies of one prompt fed different tokens."""
    prompts, inputs = _inputs("padded" if path == "padded" else "host", seed=3)
    cache = _make(method, model, static=path == "static")
    mask = inputs.get("attention_mask")
    ids = inputs["input_ids"]
    with torch.no_grad():
        positions = (mask.cumsum(-1) - 1).clamp(min=0) if mask is not None else torch.arange(ids.shape[1])[None]
        model(input_ids=ids, attention_mask=mask, cache=cache, position_ids=positions)
    cache.batch_repeat_interleave(2)  # rows: p0 p0 p1 p1
    cache.reorder_cache(torch.tensor([2, 0, 3, 1]))  # p1 p0 p1 p0
    cache.batch_select_indices(torch.tensor([0, 1, 3]))  # p1 p0 p0
    order = [1, 0, 0]
    if mask is not None:
        mask = mask[[0, 0, 1, 1]][[2, 0, 3, 1]][[0, 1, 3]]
    assert cache.batch_size == 3
    g = torch.Generator().manual_seed(4)  # distinct tokens, none in the row's own prompt (see _prompts)
    tokens = torch.stack([torch.tensor([t for t in (torch.randperm(93, generator=g) + 3).tolist()
                                        if t not in set(prompts[b].tolist())][:12]) for b in order])
    starts = [len(prompts[b]) for b in order]
    got = _feed(model, cache, tokens, starts, mask)
    _compacted(cache)
    for row, b in enumerate(order):
        alone = _make(method, model)
        with torch.no_grad():
            model(input_ids=prompts[b][None], cache=alone, position_ids=torch.arange(len(prompts[b]))[None])
        expected = _feed(model, alone, tokens[row : row + 1], [starts[row]], None)
        assert (got[row] - expected[0]).abs().max() <= 1e-4, f"row {row} (prompt {b})"
        for layer in range(len(alone.layers)):
            assert torch.equal(cache.token_positions(layer, row), alone.token_positions(layer)), (row, layer)
    if path == "static":
        assert cache._static.armed  # the reordered rows went back into the fixed buffers


def test_crop_is_refused_in_one_line(model):
    cache = _make("lacache", model)
    with pytest.raises(NotImplementedError) as refused:
        cache.crop(-1)
    assert "\n" not in str(refused.value) and "assistant_model/prompt_lookup_num_tokens" in str(refused.value)


# ----------------------------------------------------------------------------- streamers and stopping
class _Recording(TextIteratorStreamer):
    """A ``TextIteratorStreamer`` that also keeps the token ids it was given."""

    def __init__(self, tokenizer):
        super().__init__(tokenizer, skip_prompt=True)
        self.ids: list[torch.Tensor] = []

    def put(self, value):
        self.ids.append(value.reshape(-1).clone())
        super().put(value)


def _hand_fed(streamer, sequence: torch.Tensor, prompt: int):
    streamer.put(sequence[:prompt][None])
    for token in sequence[prompt:]:
        streamer.put(token.view(1))
    streamer.end()
    return streamer


@pytest.fixture(scope="module")
def worded():
    tokenizer, model = bundled_tokenizer_and_tiny_model()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return tokenizer, model


@pytest.mark.parametrize("method,static", [("lacache", False), ("knorm", False), ("tova", False), ("h2o", False),
                                           ("lacache-salient", False), ("lacache", True), ("knorm", True)])
@pytest.mark.parametrize("do_sample", [False, True])
def test_streamers_get_exactly_the_generated_tokens(worded, capsys, method, static, do_sample):
    """``TextIteratorStreamer`` and ``TextStreamer`` over a compacting cache: the streamer gets the prompt and then
    every generated token, and its text is what the same streamer fed the returned sequence by hand gives; the
    tokens are those of the same run without a streamer."""
    tokenizer, model = worded
    prompt = torch.randint(3, 4000, (1, PROMPT), generator=torch.Generator().manual_seed(5))
    settings = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=do_sample)
    torch.manual_seed(0)
    plain = model.generate(prompt, cache=_make(method, model, static), **settings)
    streamer = _Recording(tokenizer)
    torch.manual_seed(0)
    cache = _make(method, model, static)
    out = model.generate(prompt, cache=cache, streamer=streamer, **settings)
    _compacted(cache)
    assert torch.equal(out, plain) and torch.equal(torch.cat(streamer.ids), out[0])
    assert "".join(streamer) == "".join(_hand_fed(TextIteratorStreamer(tokenizer, skip_prompt=True), out[0], PROMPT))
    capsys.readouterr()
    torch.manual_seed(0)
    model.generate(prompt, cache=_make(method, model, static), streamer=TextStreamer(tokenizer, skip_prompt=True),
                   **settings)
    printed = capsys.readouterr().out
    _hand_fed(TextStreamer(tokenizer, skip_prompt=True), out[0], PROMPT)
    assert printed == capsys.readouterr().out


def test_a_streamer_with_beam_search_is_refused_by_transformers_before_the_cache_is_used(model):
    cache = _make("lacache", model)
    with pytest.raises(ValueError, match="`streamer` cannot be used with beam search"):
        model.generate(torch.stack(_prompts((PROMPT,))), cache=cache, num_beams=2, max_new_tokens=4,
                       streamer=TextStreamer(None))
    assert cache.seen == 0


def test_a_text_streamer_over_a_batch_is_refused_by_transformers_before_the_cache_is_used(worded):
    tokenizer, model = worded
    cache = _make("lacache", model)
    ids = torch.randint(3, 4000, (2, PROMPT), generator=torch.Generator().manual_seed(8))
    with pytest.raises(ValueError, match="only supports batch size 1"):
        model.generate(ids, attention_mask=torch.ones_like(ids), cache=cache, max_new_tokens=4,
                       streamer=TextStreamer(tokenizer))
    assert cache.seen == 0


class _StopAfter(StoppingCriteria):
    """Row ``b`` is done once it generated ``counts[b]`` tokens."""

    def __init__(self, prompt: int, counts: list[int]):
        self.prompt, self.counts = prompt, counts

    def __call__(self, input_ids, scores, **kwargs):
        made = input_ids.shape[1] - self.prompt
        return torch.tensor([made >= count for count in self.counts], device=input_ids.device)


@pytest.mark.parametrize("method,path", _cells(["lacache", "knorm", "tova", "lacache-salient"]))
def test_custom_stopping_criteria_stop_each_row_where_it_stops_alone(model, method, path):
    """A stopping criterion that ends rows at different steps ends the run when the last row is done; every row
    is its run alone up to there (a row marked done early goes on like its run alone, as transformers keeps
    generating for it without an eos token)."""
    prompts, inputs = _inputs("padded" if path == "padded" else "host", seed=6)
    counts = [7, 12]
    width = inputs["input_ids"].shape[1]
    static = path == "static"
    stop = StoppingCriteriaList([_StopAfter(width, counts)])
    cache = _make(method, model, static)
    out = model.generate(**inputs, cache=cache, max_new_tokens=NEW, do_sample=False, stopping_criteria=stop,
                         **DISTINCT)
    assert out.shape[1] == width + max(counts)
    _compacted(cache)
    for b, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], cache=_make(method, model, static), max_new_tokens=NEW, do_sample=False,
                               **DISTINCT)
        assert torch.equal(out[b, width:], alone[0, len(prompt) : len(prompt) + max(counts)]), f"row {b}"


@pytest.mark.parametrize("method,static", [("lacache", False), ("knorm", False), ("tova", False), ("lacache", True),
                                           ("knorm", True)])
def test_stop_strings_end_the_run_where_the_string_appears(worded, method, static):
    tokenizer, model = worded
    prompt = torch.randint(3, 4000, (1, PROMPT), generator=torch.Generator().manual_seed(7))
    settings = dict(max_new_tokens=NEW, min_new_tokens=0, do_sample=False)
    full = model.generate(prompt, cache=_make(method, model, static), **settings)[0]
    late = (tokenizer.decode(token).strip() for token in full[PROMPT + 14 :])  # after compactions
    stop = next(text for text in late if text)
    cache = _make(method, model, static)
    stopped = model.generate(prompt, cache=cache, stop_strings=[stop], tokenizer=tokenizer, **settings)[0]
    _compacted(cache)
    assert len(stopped) < len(full) and torch.equal(stopped, full[: len(stopped)])
    assert stop in tokenizer.decode(stopped[PROMPT:])


# ----------------------------------------------------------------------------- refused modes
def _one_line(error: BaseException) -> str:
    message = str(error)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("kind", sorted(ASSISTED))
@pytest.mark.parametrize("method,path", _cells(["lacache", "knorm", "tova", "h2o", "lacache-salient"], ("host", "static")))
def test_assisted_generation_is_refused_before_the_cache_stores_anything(model, method, path, kind):
    """Assisted/speculative decoding and prompt lookup: one line naming the mode, before any forward with the cache
    (nothing is returned, nothing stored); a static cache likewise."""
    cache = _make(method, model, static=path == "static")
    prompt = torch.arange(PROMPT)[None] % 12 + 3  # repeats, so prompt lookup finds drafts
    with pytest.raises(ValueError) as refused:
        model.generate(prompt, cache=cache, max_new_tokens=NEW, do_sample=False, **ASSISTED[kind]())
    message = _one_line(refused.value)
    assert "'assisted_generation'" in message and "generate without them" in message
    assert cache.seen == 0 and cache.num_slots == 0


def test_assisted_generation_over_a_padded_batch_is_refused_before_the_cache_stores_anything(model):
    """transformers itself takes assisted decoding for one sequence only; the cache stays untouched."""
    _, inputs = _inputs("padded")
    cache = _make("lacache", model)
    with pytest.raises(ValueError, match="assisted"):
        model.generate(**inputs, cache=cache, max_new_tokens=NEW, prompt_lookup_num_tokens=3)
    assert cache.seen == 0


@pytest.mark.parametrize("mode", sorted(HUB_MODES, key=str))
@pytest.mark.parametrize("path", ["host", "padded", "static"])
def test_hub_modes_are_stopped_by_transformers_offline_before_the_cache_is_used(model, mode, path):
    """What happens here, offline: transformers asks for trust_remote_code (and, given it, cannot download the
    repository), before any forward."""
    _, inputs = _inputs(path if path == "padded" else "host")
    cache = _make("lacache", model, static=path == "static")
    with pytest.raises(ValueError, match="requires `trust_remote_code=True`"):
        model.generate(**inputs, cache=cache, max_new_tokens=NEW, **HUB_MODES[mode])
    assert cache.seen == 0


def _stand_in_repository(folder) -> str:
    """A local stand-in for a ``transformers-community`` mode repository: its ``generate`` drives the cache it is
    handed, as the real code does, by calling the model."""
    code = folder / "custom_generate"
    code.mkdir(parents=True)
    (code / "generate.py").write_text(textwrap.dedent('''
        import torch


        def generate(model, inputs=None, **kwargs):
            ids = inputs if inputs is not None else kwargs["input_ids"]
            with torch.no_grad():
                model(input_ids=ids, attention_mask=kwargs.get("attention_mask"), cache=kwargs["cache"])
            return ids
    '''))
    (code / "requirements.txt").write_text("torch\n")
    return str(folder)


@pytest.mark.parametrize("mode", sorted(HUB_MODES, key=str))
@pytest.mark.parametrize("path,method", [("host", "lacache"), ("host", "knorm"), ("host", "tova"), ("host", "h2o"),
                                         ("host", "lacache-salient"), ("padded", "lacache"), ("static", "lacache"),
                                         ("static", "knorm")])
def test_hub_mode_code_is_refused_by_the_cache_before_it_stores_anything(model, tmp_path, monkeypatch, mode, path,
                                                                         method):
    """When the hub code does run (online, trust_remote_code=True), the cache refuses its first forward in one line
    naming the mode: reached through the mode's flags, and through its repository named as ``custom_generate``."""
    repo = _stand_in_repository(tmp_path / "repo")
    monkeypatch.setitem(generation_utils.GENERATION_MODES_MAPPING, mode, repo)
    _, inputs = _inputs(path if path == "padded" else "host")
    for how in ({}, {"custom_generate": repo}):
        cache = _make(method, model, static=path == "static")
        with pytest.raises(ValueError) as refused:
            model.generate(**inputs, cache=cache, max_new_tokens=NEW, trust_remote_code=True, **HUB_MODES[mode],
                           **how)
        message = _one_line(refused.value)
        assert f"generate() mode {mode.value!r}" in message and "lacache cannot check" in message
        assert "use greedy search, sampling or beam search" in message
        assert cache.seen == 0


@pytest.mark.parametrize("mode", sorted(HUB_MODES, key=str))
def test_hub_modes_are_refused_by_lacache_generate(model, mode):
    """``custom_generate=lacache.generate`` names the mode it does not run, before building a cache."""
    with pytest.raises(ValueError, match=rf"supports greedy search, sampling and beam search; got generation mode "
                                         rf"'{mode.value}'"):
        model.generate(torch.stack(_prompts((PROMPT,))), custom_generate=lacache.generate, max_new_tokens=NEW,
                       **HUB_MODES[mode])


def test_every_generation_mode_is_served_or_refused():
    """The modes this file (and the matrix) covers are all the installed transformers has: a new mode fails here."""
    served = {GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE, GenerationMode.BEAM_SEARCH,
              GenerationMode.BEAM_SAMPLE}
    assert set(GenerationMode) == served | set(HUB_MODES) | {GenerationMode.ASSISTED_GENERATION}
    hub = {mode for mode, repo in generation_utils.GENERATION_MODES_MAPPING.items() if "/" in repo}
    assert hub == set(HUB_MODES)
