"""What the plugin refuses: engine options at engine start (before the model loads), request parameters at
admission (an HTTP 400 naming the parameter); one table each, one line per refusal.

Each ``EngineRefusal`` reads the ``EngineArgs`` the user gave and the ``VllmConfig`` vLLM built
from them (``EngineArgs.create_engine_config``, where ``lacache.vllm.plugin`` looks at every
engine), and says what to do instead. The support matrix (``lacache.support.vllm_cells``) lists
these rows as refused cells, and ``tests/serving/test_vllm_refusals.py`` starts an engine with each
one. This module imports no vLLM: it only reads attributes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["EngineRefusal", "REFUSALS", "RequestRefusal", "REQUEST_REFUSALS", "SERVED_ROPE_TYPES", "engine_refusals",
           "request_refusal", "rope_types"]

#: RoPE scalings whose angle table the worker turns moved keys with exactly (the table's magnitude, the
#: attention factor of YaRN, is divided out; see ``WorkerState._rotate``), each tested against the
#: transformers cache on a tiny model. Others are refused: "dynamic" NTK rescales by vLLM's
#: ``max_model_len`` where transformers rescales by the sequence's length, "longrope" switches tables
#: by position, and M-RoPE reads three position streams.
SERVED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def rope_types(hf_text_config) -> list[str]:
    """The ``rope_type`` of every RoPE parameter set a (text) config declares (nested per layer type too)."""
    params = getattr(hf_text_config, "rope_parameters", None) or getattr(hf_text_config, "rope_scaling", None)
    if not isinstance(params, dict) or not params:
        return ["default"]
    sets = [p for p in params.values() if isinstance(p, dict)] if all(isinstance(p, dict) for p in params.values()) \
        else [params]
    return [str(p.get("rope_type", p.get("type", "default"))) for p in sets] or ["default"]


@dataclass(frozen=True)
class EngineRefusal:
    """One engine option the plugin refuses, how to see it, and what to do instead."""

    option: str  # as the user writes it (the CLI flag, or LLM(...) keyword)
    why: str  # one clause: why a bounded cache cannot take it
    instead: str  # one clause: what to do
    applies: Callable[[object, object], bool]  # (engine_args, vllm_config) -> refused?
    #: an engine argument / LLM keyword and value that trips it (the tests start an engine with each)
    example: tuple = ()
    #: the methods it applies to (the support matrix's scope)
    methods: str = "every method"

    def message(self) -> str:
        return f"lacache: {self.option} is not served with a bounded KV cache: {self.why}; {self.instead}"


def _get(obj, *path, default=None):
    for name in path:
        obj = getattr(obj, name, None)
        if obj is None:
            return default
    return obj


def _ranks_half_precision_keys(args, config) -> bool:
    """A rule that ranks slots by a key statistic, in a dtype other than float32 (its slot choice is then not
    the transformers cache's: the keys' own rounding moves the statistic across the 8-bit values both backends
    compare)."""
    from .config import is_half_precision, serving_config

    if not is_half_precision(config):
        return False

    try:
        served = serving_config(config)
    except (ValueError, TypeError, AttributeError):  # a bad lacache key is refused by its own check
        return False
    return served is not None and served.reads_keys


def _rope_refused(args, config) -> bool:
    text = _get(config, "model_config", "hf_text_config")
    return text is not None and any(t not in SERVED_ROPE_TYPES for t in rope_types(text))


REFUSALS: tuple[EngineRefusal, ...] = (
    EngineRefusal("--speculative-config", "a rejected draft token would have to be taken back, and compaction "
                  "has already dropped what it displaced", "leave speculative decoding off",
                  lambda a, c: _get(c, "speculative_config") is not None,
                  ("speculative_config", {"method": "ngram", "num_speculative_tokens": 2,
                                          "prompt_lookup_max": 3, "prompt_lookup_min": 1})),
    EngineRefusal("--kv-cache-dtype", "compaction reads, turns and rewrites keys in the model's dtype, and "
                  "quantised pages (fp8 and friends) carry scales it does not move",
                  "use --kv-cache-dtype auto (the model's dtype)",
                  lambda a, c: str(_get(c, "cache_config", "cache_dtype", default="auto")) != "auto",
                  ("kv_cache_dtype", "fp8")),
    EngineRefusal("--kv-offloading-size (KV offloading)", "offloaded blocks are copied back by logical "
                  "position, and compaction moves slots under them", "leave KV offloading off",
                  lambda a, c: _get(c, "cache_config", "kv_offloading_size") is not None,
                  ("kv_offloading_size", 1.0)),
    EngineRefusal("--kv-transfer-config (KV connectors)", "a connector ships or loads KV blocks by logical "
                  "position, and compaction moves slots under it", "leave the connector out",
                  lambda a, c: _get(c, "kv_transfer_config") is not None,
                  ("kv_transfer_config", {"kv_connector": "ExampleConnector", "kv_role": "kv_both"})),
    EngineRefusal("--pipeline-parallel-size > 1", "the plugin has not been run across pipeline stages (each "
                  "stage compacts its own layers, untested end to end)",
                  "use --tensor-parallel-size to split the model instead",
                  lambda a, c: int(_get(c, "parallel_config", "pipeline_parallel_size", default=1)) > 1,
                  ("pipeline_parallel_size", 2)),
    EngineRefusal("a key-reading method (knorm, keydiff, lacache-salient, lacache-group) in bfloat16 or float16",
                  "half-precision keys move the key statistic across the 8-bit values the rule ranks by, so it would keep "
                  "other slots than the transformers cache (1.3% of lacache-group's, fed the same tokens; "
                  "docs/serving.md)",
                  "serve it with --dtype float32 (lacache serve's default), or name no method (lacache-capped in "
                  "half precision)",
                  _ranks_half_precision_keys, methods="knorm, keydiff, lacache-salient, lacache-group"),
    EngineRefusal("--data-parallel-size > 1", "data-parallel engines are not tested with the plugin",
                  "run one server per replica behind a load balancer",
                  lambda a, c: int(_get(c, "parallel_config", "data_parallel_size", default=1)) > 1,
                  ("data_parallel_size", 2)),
    EngineRefusal("--async-scheduling", "the plugin compacts between steps, so the next step must be scheduled "
                  "after the last one ran (vLLM would switch it off silently)", "leave --async-scheduling out",
                  lambda a, c: getattr(a, "async_scheduling", None) is True,
                  ("async_scheduling", True)),
    EngineRefusal("--scheduling-policy priority", "a higher-priority arrival preempts running requests, and a "
                  "preempted bounded request is recomputed from token 0 in other passes",
                  "use the default fcfs policy",
                  lambda a, c: str(_get(c, "scheduler_config", "policy", default="fcfs")) == "priority",
                  ("scheduling_policy", "priority")),
    EngineRefusal("--enable-lora", "LoRA adapters with a bounded cache are not tested end to end",
                  "serve the merged model, or leave LoRA off",
                  lambda a, c: _get(c, "lora_config") is not None,
                  ("enable_lora", True)),
    EngineRefusal("--enable-prompt-embeds", "requests given as embeddings are not tested with the plugin, and "
                  "a kept cache is keyed on token ids", "send token ids or text",
                  lambda a, c: bool(_get(c, "model_config", "enable_prompt_embeds", default=False)),
                  ("enable_prompt_embeds", True)),
    EngineRefusal("--no-enforce-eager (compiled model)", "the plugin edits positions and slot mappings between "
                  "steps and is tested in eager mode only", "pass --enforce-eager (lacache serve does by default)",
                  lambda a, c: not bool(_get(c, "model_config", "enforce_eager", default=True)),
                  ("enforce_eager", False)),
    EngineRefusal("a multimodal model", "image and audio tokens are placed by M-RoPE or encoder caches the "
                  "position shift does not model", "serve a text-only model",
                  lambda a, c: bool(_get(c, "model_config", "is_multimodal_model", default=False))
                  or bool(_get(c, "model_config", "uses_mrope", default=False))),
    EngineRefusal("a sliding-window, hybrid or MLA model", "its layers are not all plain full attention, which "
                  "compaction assumes", "serve a full-attention model (e.g. Llama, Qwen2, Mistral without "
                  "sliding window)",
                  lambda a, c: _get(c, "model_config", "get_sliding_window") is not None
                  and (c.model_config.get_sliding_window() is not None
                       or bool(getattr(c.model_config, "use_mla", False))
                       or bool(getattr(c.model_config, "is_hybrid", False)))),
    EngineRefusal("rope_scaling / rope_parameters", f"only the RoPE types {', '.join(SERVED_ROPE_TYPES)} are "
                  "re-rotated exactly after a compaction", "serve a model with one of them",
                  _rope_refused),
)


def engine_refusals(engine_args, vllm_config) -> list[str]:
    """One message per refused option this engine sets (empty: the plugin can serve it)."""
    return [refusal.message() for refusal in REFUSALS if refusal.applies(engine_args, vllm_config)]


@dataclass(frozen=True)
class RequestRefusal:
    """One request parameter (a ``SamplingParams`` field) the plugin refuses, and what to do instead."""

    parameter: str
    why: str
    instead: str

    def set_in(self, params) -> bool:
        value = getattr(params, self.parameter, None)
        return value not in (None, 0, False, {}, [])

    def message(self) -> str:
        return f"lacache: {self.parameter} is not served with a bounded KV cache: {self.why}; {self.instead}"


#: ``SamplingParams`` fields that change more than how a token is picked from the logits, or that no test
#: compares with the transformers cache: refused per request, so one request never costs the others.
REQUEST_REFUSALS: tuple[RequestRefusal, ...] = (
    RequestRefusal("prompt_logprob_token_ids", "prompt logprobs of chosen tokens are not compared with the "
                   "transformers cache", "ask for prompt_logprobs=N instead"),
    RequestRefusal("prompt_logprob_start", "partial prompt logprobs are not compared with the transformers cache",
                   "ask for prompt_logprobs=N over the whole prompt"),
    RequestRefusal("watermarking", "watermarked sampling is not tested with the plugin", "leave it off"),
    RequestRefusal("thinking_token_budget", "forced end-of-thinking tokens are not tested with the plugin",
                   "leave it unset"),
    RequestRefusal("repetition_detection", "early stops on repetition are not tested with the plugin",
                   "leave it unset"),
    RequestRefusal("routed_experts_prompt_start", "it reports MoE routing, and the plugin serves dense models",
                   "leave it unset"),
    RequestRefusal("trace_decode_token_ids", "decode tracing is not tested with the plugin", "leave it unset"),
    RequestRefusal("flat_logprobs", "the flat logprobs container is not compared with the transformers cache",
                   "leave it off (logprobs come as one dict per token)"),
    RequestRefusal("extra_args", "custom logits processors' arguments are not tested with the plugin",
                   "leave extra_args (vllm_xargs) unset"),
)


def request_refusal(params) -> RequestRefusal | None:
    """The first refused parameter a request's ``SamplingParams`` sets, or None."""
    return next((refusal for refusal in REQUEST_REFUSALS if refusal.set_in(params)), None)
