"""The transformers rows of the support matrix: every ``generate()`` mode and option, on the three paths.

Paths: the host path (the default cache, ``static=False``), a left-padded batch (one single-row cache
per sequence, ``cache.padded``) and ``static=True`` (fixed buffers, compiled decode). Method families:
index-only (``lacache``, ``lacache-capped``, ``lacache-reference``, ``streaming``), key-norm
(``knorm``), KeyDiff (``keydiff``), attention-score (``tova``, ``h2o``) and the salient pool (``lacache-salient``,
``lacache-group``). Every ``GenerationMode`` of transformers appears by its value in an option text
(tests/test_support_matrix.py checks it); tests/test_generate_modes.py holds most cells.
Importing this imports no torch and no transformers.
"""

from __future__ import annotations

from .cell import EXACT, REFUSED, Cell

__all__ = ["CELLS"]

_T = "transformers"
_M = "tests/test_generate_modes.py::"
_EVERY = ("index-only, key-norm, keydiff, attention-score (tova, h2o), salient pool (lacache-salient, "
          "lacache-group)")
_STATIC = "static=True: index-only and key-norm"
_REPLAYED = _M + "test_each_returned_row_is_its_sequence_replayed_alone"
_BEAMS_REPLAYED = _M + "test_each_beams_score_is_its_sequence_replayed_alone"
_STATIC_EAGER = _M + "test_static_generate_equals_the_eager_cache"
_REPLAY = ("a fresh single-sequence cache of the same method fed the returned sequence (prompt in one pass, then one "
           "token per pass, as generate feeds it), itself held to the independent reference forward by test_cache, "
           "test_baselines, test_salient and test_reference_schedule")


def _hub_mode(option: str, flags: str) -> Cell:
    return Cell(
        _T, f"{option}: {flags}", "every path (host, left-padded batch, static=True) and method (one check in the cache's "
        "decoder hook; tested with lacache, knorm, tova, h2o, lacache-salient)", REFUSED,
        "transformers 5 runs it from a transformers-community hub repository (custom_generate), code lacache cannot "
        "read or test. Offline transformers stops it first, before the cache is used: without trust_remote_code=True "
        "a ValueError asking for it, with it an OSError (the repository cannot be downloaded). When the hub code does "
        "run, the cache's decoder hook refuses its first forward in one line naming the mode, before anything is "
        "stored; custom_generate=lacache.generate refuses it before building a cache. Use greedy search, sampling "
        "or beam search with a bounded cache, or a DynamicCache for this mode",
        (_M + "test_hub_modes_are_stopped_by_transformers_offline_before_the_cache_is_used",
         _M + "test_hub_mode_code_is_refused_by_the_cache_before_it_stores_anything",
         _M + "test_hub_modes_are_refused_by_lacache_generate"),
        where="generate() call",
    )


CELLS: list[Cell] = [
    # ------------------------------------------------------------------ greedy search
    Cell(_T, "greedy search (`greedy_search`)", f"host path; {_EVERY}", EXACT,
         "each step's logits equal the independent reference forward over the tokens each layer holds; with a "
         f"repetition penalty, every returned row's logits at every step equal {_REPLAY}; with a budget above the "
         "stream's length, DynamicCache's tokens",
         ("tests/test_cache.py::test_generate_matches_reference_with_eviction",
          "tests/test_baselines.py::test_score_caches_match_reference_per_sequence",
          "tests/test_salient.py::test_salient_ladder_matches_reference",
          "tests/test_cache.py::test_budget_above_length_equals_dynamic_cache", _REPLAYED)),
    Cell(_T, "greedy search (`greedy_search`)", f"left-padded batch; {_EVERY}", EXACT,
         "each row gives the tokens and logits it gives alone (every row compacts its own budget), and every row's "
         "logits equal its sequence replayed alone",
         ("tests/test_padding.py::test_padded_batch_rows_equal_rows_alone", _REPLAYED)),
    Cell(_T, "greedy search (`greedy_search`)", _STATIC, EXACT,
         "the eager (host-path) cache's tokens, logits, token index and slot count: eager steps, "
         "torch.compile(fullgraph=True) without recompiling, generate() with compile_config; key-norm's step "
         "chooses each sequence's survivors as the host rule does",
         ("tests/test_static.py::test_eager_static_steps_equal_the_host_path",
          "tests/test_static.py::test_generate_compiles_a_static_cache_and_matches_the_host_path",
          "tests/test_static.py::test_knorm_static_steps_choose_what_the_host_rule_chooses", _STATIC_EAGER)),
    # ------------------------------------------------------------------ sampling
    Cell(_T, "sampling (`sample`: `do_sample=True`, `top_k`, `temperature`), `num_return_sequences>1`",
         f"host path and left-padded batch; {_EVERY}", EXACT,
         f"every returned row's logits at every step (several samples per prompt) equal {_REPLAY}",
         (_REPLAYED,)),
    Cell(_T, "sampling (`sample`), `num_return_sequences>1`", _STATIC, EXACT,
         "with the same seed, the eager cache's tokens and logits, and the same tokens held",
         (_STATIC_EAGER,)),
    # ------------------------------------------------------------------ beams
    Cell(_T, "beam search (`beam_search`) and beam sampling (`beam_sample`): `num_beams>1`, `num_return_sequences>1`",
         f"host path and left-padded batch; {_EVERY}", EXACT,
         "each returned beam's score (length_penalty=0: the sum of its tokens' log-probabilities) equals its sequence "
         f"replayed alone: {_REPLAY}. reorder_cache moves each layer's keys, values, position frame and token index "
         "and the rule's per-sequence state (key norms, accumulated attention, salient pool) with its beam; a padded "
         "batch reorders whole row caches, and each row equals that row alone",
         (_BEAMS_REPLAYED, "tests/test_padding.py::test_beam_search_over_a_padded_batch_equals_each_row_alone")),
    Cell(_T, "beam search (`beam_search`) and beam sampling (`beam_sample`): `num_beams>1`, `num_return_sequences>1`",
         _STATIC, EXACT,
         "the eager cache's tokens, logits, beam scores and held tokens: a static cache reorders on the host path "
         "(its compiled steps replayed first) and moves the reordered slots, key-norm's per-slot norms and token "
         "indices back into its fixed buffers at the same addresses",
         (_STATIC_EAGER,)),
    # ------------------------------------------------------------------ options of every loop
    Cell(_T, "repetition penalty (`repetition_penalty`), `no_repeat_ngram_size` and other logits processors",
         f"host path and left-padded batch: {_EVERY}; static=True: index-only and key-norm", EXACT,
         "processors read the token ids and the logits only: the raw logits equal the sequence replayed alone, and "
         "a static cache gives the eager cache's tokens",
         (_REPLAYED, _BEAMS_REPLAYED, _STATIC_EAGER)),
    Cell(_T, "streamers (`streamer=`: `TextStreamer`, `TextIteratorStreamer`)",
         "greedy search and sampling, one sequence; host path: index-only, key-norm, tova, h2o, lacache-salient; "
         "static=True: lacache, knorm", EXACT,
         "the streamer gets the prompt then every generated token, and prints or yields exactly what the same "
         "streamer fed the returned sequence by hand does; the tokens are those of the run without a streamer",
         (_M + "test_streamers_get_exactly_the_generated_tokens",
          "tests/test_hub_generate.py::test_streamer_still_receives_tokens")),
    Cell(_T, "streamers with beam search (`streamer=` and `num_beams>1`), or a text streamer over a batch",
         "every path and method", REFUSED,
         "transformers refuses both in one line before the cache is used (streamers take one sequence's tokens, "
         "one at a time); stream greedy or sampled runs of one sequence",
         (_M + "test_a_streamer_with_beam_search_is_refused_by_transformers_before_the_cache_is_used",
          _M + "test_a_text_streamer_over_a_batch_is_refused_by_transformers_before_the_cache_is_used"),
         where="generate() call"),
    Cell(_T, "custom stopping criteria (`stopping_criteria=`), rows finishing at different steps",
         "host path, left-padded batch and static=True; lacache, knorm, tova, lacache-salient", EXACT,
         "the run ends where the criterion says, and every row is its run alone up to there",
         (_M + "test_custom_stopping_criteria_stop_each_row_where_it_stops_alone",)),
    Cell(_T, "stop strings (`stop_strings=` with `tokenizer=`)", "host path and static=True; lacache, knorm, tova",
         EXACT, "the run is the run without stop strings, cut where the string appears (after compactions)",
         (_M + "test_stop_strings_end_the_run_where_the_string_appears",)),
    # ------------------------------------------------------------------ the Cache methods generate calls
    Cell(_T, "`Cache.reorder_cache`, `Cache.batch_repeat_interleave`, `Cache.batch_select_indices`",
         f"host path and left-padded batch: {_EVERY}; static=True: index-only and key-norm", EXACT,
         "after repeating, reordering and selecting the rows of a cache, each row continues exactly as its prompt "
         "alone (logits and the tokens each layer holds), copies of one prompt fed different tokens included",
         (_M + "test_reorder_repeat_and_select_rows_continue_like_each_row_alone",)),
    Cell(_T, "`Cache.crop` (assisted decoding's rollback)", "every path and method", REFUSED,
         "a bounded cache cannot restore the tokens it evicted: one-line NotImplementedError; generate without "
         "assistant_model/prompt_lookup_num_tokens (assisted generation is refused before it gets here)",
         (_M + "test_crop_is_refused_in_one_line", "tests/test_errors.py::test_crop_is_refused_clearly"),
         where="cache call"),
    # ------------------------------------------------------------------ refused modes
    Cell(_T, "assisted generation (`assisted_generation`): `assistant_model`, `prompt_lookup_num_tokens` (prompt lookup "
         "decoding), `assistant_early_exit`",
         "host path and static=True; lacache, knorm, tova, h2o, lacache-salient", REFUSED,
         "drafts the model rejects must be cropped out of the cache, and a bounded cache cannot restore what it "
         "evicted to make room for them: the cache's decoder hook refuses the first forward in one line naming the "
         "mode, before anything is stored or returned; custom_generate=lacache.generate refuses it too. Generate "
         "without them (greedy, sampling or beam search)",
         (_M + "test_assisted_generation_is_refused_before_the_cache_stores_anything",
          "tests/test_hub_generate.py::test_assisted_decoding_refused"),
         where="generate() call"),
    Cell(_T, "assisted generation (`assisted_generation`) over a batch", "left-padded batch", REFUSED,
         "transformers takes assisted decoding for one sequence only and refuses a batch in one line before the "
         "cache is used; generate without prompt_lookup_num_tokens/assistant_model",
         (_M + "test_assisted_generation_over_a_padded_batch_is_refused_before_the_cache_stores_anything",),
         where="generate() call"),
    _hub_mode("contrastive search (`contrastive_search`)", "`penalty_alpha` with `top_k`"),
    _hub_mode("DoLa decoding (`dola_generation`)", "`dola_layers`"),
    _hub_mode("group (diverse) beam search (`group_beam_search`)", "`num_beam_groups>1`, `diversity_penalty`"),
    _hub_mode("constrained beam search (`constrained_beam_search`)", "`force_words_ids`, `constraints`"),
    # ------------------------------------------------------------------ paths refused as a whole
    Cell(_T, "`static=True` with TOVA, H2O, KeyDiff or the salient pool (any generate mode)", "tova, h2o, keydiff, "
         "lacache-salient, lacache-group", REFUSED,
         "TOVA and H2O read each step's attention, which a compiled step never shows the cache; KeyDiff and the "
         "salient pool have no static decode path: refused by name when the cache is built; leave static=False",
         ("tests/test_static.py::test_static_is_refused_for_rules_without_a_static_path",),
         where="cache build"),
    Cell(_T, "`static=True` with a left-padded batch (any generate mode)", "index-only and key-norm", REFUSED,
         "generate() hands a compileable cache a 4D attention mask, which a bounded cache cannot lay out per row: "
         "refused at the first forward; build the cache with static=False for padded batches, or batch prompts of "
         "equal length",
         ("tests/test_static.py::test_a_padded_batch_works_eagerly_with_its_2d_mask_and_is_refused_as_a_4d_one",),
         where="generate() call"),
    # ------------------------------------------------------------------ how a prompt is cut into passes
    Cell(_T, "a stream fed in passes of any size (`stream_generate(prefill_chunk=...)`, `lacache chat`, chunked "
         "evaluations, `bench prefill`)", "host path; every method but the authors' schedule", EXACT,
         "passes end at the cache's compaction points (`policies.points`), so the tokens and what every layer holds "
         "are the same for prefill chunks of 7, 64 and 300 tokens and equal token-by-token feeding (hypothesis, on "
         "the vLLM replay, the transformers cache and the static planner alike)",
         ("tests/test_points.py::test_stream_generate_gives_the_same_tokens_and_slots_for_any_prefill_chunk",
          "tests/test_points.py::test_the_bundled_model_gives_the_same_tokens_for_any_prefill_chunk",
          "tests/test_points.py::test_any_split_at_the_points_holds_what_token_by_token_holds",
          "tests/test_points.py::test_a_score_rule_with_a_chunk_holds_the_same_slots_for_any_split")),
    Cell(_T, "a one-pass prefill (`generate(prompt)`) and `prefill_chunk_size=k`", f"host path; {_EVERY}", EXACT,
         "the other semantics: each pass (the whole prompt, or each chunk of k) is attended at once, then compacted "
         "(to what token-by-token feeding holds at its end); exact against lacache's own loop fed the same passes. "
         "A k that divides the cache's period (`cache.points.period`) crosses no point and gives stream_generate's "
         "tokens; the authors' schedule is exact in the same passes only",
         ("tests/test_cache.py::test_generate_with_chunked_prefill_matches_own_loop",
          "tests/test_cache.py::test_generate_in_chunks_that_divide_the_period_keeps_the_stream_semantics",
          "tests/test_cache.py::test_generate_matches_reference_with_eviction")),
    # ------------------------------------------------------------------ lacache's own entry point
    Cell(_T, "`custom_generate=lacache.generate` (a callable, a hub folder, pipelines)",
         "greedy search and sampling; lacache, streaming (the cache make_cache builds, as in the rows above)", EXACT,
         "the tokens of generate(cache=make_cache(method, ...)) with the same settings; pipeline prompts batched with "
         "left padding give what each prompt gives alone",
         ("tests/test_hub_generate.py::test_tokens_equal_generate_with_cache",
          "tests/test_hub_generate.py::test_direct_call_and_sampling",
          "tests/test_hub_generate.py::test_hub_folder_contract",
          "tests/test_hub_generate.py::test_pipeline_batches_left_padded_prompts_exactly")),
]
