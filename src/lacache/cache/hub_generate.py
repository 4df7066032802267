"""``custom_generate`` entry point: any model's ``generate()`` / pipeline with a fresh bounded cache per call.

Usage (a callable, no hub round-trip)::

    import lacache

    out = model.generate(ids, custom_generate=lacache.generate, lacache_method="lacache",
                         lacache_budget=256, max_new_tokens=2000)

    pipe = transformers.pipeline("text-generation", model=model, tokenizer=tok)
    pipe(prompt, custom_generate=lacache.generate, lacache_budget=64, max_new_tokens=100)

``generate`` serves the two contracts transformers 5.x has for ``custom_generate``:

* **a callable** (``custom_generate=lacache.generate``): ``GenerationMixin.generate`` prepares the
  inputs, the generation config, the logits processors, the stopping criteria and a default cache,
  then calls ``custom_generate(model, input_ids, logits_processor=..., stopping_criteria=...,
  generation_config=..., <our own keyword arguments>, **model_kwargs)`` *instead of* its decoding
  loop. The keyword arguments of this function that ``GenerationMixin._sample`` does not have
  (``lacache_method``, ``lacache_budget``, ``lacache_options``) are taken out of ``generate``'s
  kwargs for us. Here the prepared default cache is replaced by a fresh lacache cache, and the
  standard loop for the generation mode (``_sample`` for greedy/sampling, ``_beam_search`` for
  beams) runs with it. Everything this needs arrives as those arguments, except two values
  transformers drops on the way (see :func:`_dropped_by_generate`): ``streamer`` and
  ``assistant_model``.
* **a hub repository** (``custom_generate="user/repo"``, ``trust_remote_code=True``): transformers
  downloads ``custom_generate/generate.py`` from the repo, checks ``custom_generate/requirements.txt``
  and calls its ``generate(model=model, inputs=..., generation_config=..., ..., **kwargs)`` in place of
  the whole of ``generate()``. Here the standard ``GenerationMixin.generate`` is called with
  ``cache=<fresh lacache cache>`` (never ``model.generate``, which ``from_pretrained`` may have
  replaced by this very function: no recursion).

Publishing it as a hub ``custom_generate`` folder (see docs/custom_generate.md)::

    my-repo/
      README.md                       # model card; tag it `custom_generate`
      custom_generate/
        generate.py                   # from lacache.cache.hub_generate import generate  # noqa: F401
        requirements.txt              # lacache

Either way a cache holds one conversation, so every call (every pipeline prompt) gets its own.
Assisted / speculative decoding (``assistant_model``, ``prompt_lookup_num_tokens``) is refused:
a bounded cache cannot be cropped back to rejected draft tokens.
"""

from __future__ import annotations

import inspect
import sys

from transformers import GenerationConfig
from transformers.generation import GenerationMixin
from transformers.generation.logits_process import LogitsProcessorList
from transformers.generation.stopping_criteria import StoppingCriteriaList
from transformers.generation.utils import GENERATION_MODES_MAPPING, GenerationMode

from ..registry import make_cache, option_names
from . import BoundedCache
from .compat import cache_argument
from .generation import check_sampling

__all__ = ["generate"]

#: keyword arguments only the hub contract passes (``generate``'s named parameters, forwarded whole)
_HUB_ONLY_KEYS = ("inputs", "prefix_allowed_tokens_fn", "negative_prompt_ids", "negative_prompt_attention_mask")
_LOOP_MODES = (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE, GenerationMode.BEAM_SEARCH, GenerationMode.BEAM_SAMPLE)


def _refuse_assisted(generation_config: GenerationConfig | None, kwargs: dict, assistant_model=None) -> None:
    lookup = kwargs.get("prompt_lookup_num_tokens")
    early_exit = kwargs.get("assistant_early_exit")
    if generation_config is not None:
        lookup = lookup if lookup is not None else getattr(generation_config, "prompt_lookup_num_tokens", None)
        early_exit = early_exit if early_exit is not None else getattr(generation_config, "assistant_early_exit", None)
    use_mtp = kwargs.get("use_mtp") or (generation_config is not None and getattr(generation_config, "use_mtp", False))
    used = [
        name
        for name, value in (
            ("assistant_model", assistant_model if assistant_model is not None else kwargs.get("assistant_model")),
            ("prompt_lookup_num_tokens", lookup),
            ("assistant_early_exit", early_exit),
            ("use_mtp", use_mtp or None),
        )
        if value is not None
    ]
    if used:
        raise ValueError(
            f"lacache.generate does not support assisted/speculative decoding ({', '.join(used)} given): a bounded "
            "cache evicts tokens and cannot be cropped back to rejected drafts; generate without "
            "assistant_model/prompt_lookup_num_tokens"
        )


def _options(lacache_options, method: str) -> dict:
    """``lacache_options`` checked against what ``method``'s builder takes (not a ``TypeError`` from inside it)."""
    if lacache_options is None:
        return {}
    if not isinstance(lacache_options, dict):
        raise ValueError(
            f"lacache_options={lacache_options!r} must be a dict of the method's options, e.g. {{'sinks': 64}}"
        )
    accepted = option_names(method)
    unknown = sorted(set(lacache_options) - accepted) if accepted is not None else []
    if unknown:
        takes = ", ".join(sorted(accepted)) or "no options"
        raise ValueError(f"lacache_options: lacache_method={method!r} does not take {', '.join(unknown)}; it takes {takes}")
    return dict(lacache_options)


def _check_top_p(top_p) -> None:
    """transformers refuses most bad sampling values itself but lets ``top_p=nan`` through, silently
    sampling from the whole distribution; refuse it as :func:`lacache.cache.generation.check_sampling` does."""
    if top_p is not None:
        check_sampling(0.0, top_p)


#: the two ``generate()`` arguments a callable ``custom_generate`` does not receive (see :func:`_dropped_by_generate`)
_DROPPED = ("assistant_model", "streamer")


def _dropped_by_generate(kwargs: dict) -> dict:
    """``assistant_model`` and ``streamer`` of the ``generate()`` call that runs us as its decoding loop.

    Every other input of the loop reaches us as an argument, but these two do not: transformers 5.x
    (checked up to 5.24) collects the decoding loop's own arguments in
    ``GenerationMixin._extract_generation_mode_kwargs`` (``assistant_model``, ``streamer``,
    ``synced_gpus``, ``tokenizer``) and, when ``custom_generate`` is a callable, *replaces* that dict
    by the callable's extra keyword arguments popped from ``**kwargs``
    (``generation_mode_kwargs = {k: kwargs.pop(k) for k in new_custom_keys if k in kwargs}``).
    Both are named parameters of ``generate()``, never in its ``**kwargs``, so no signature of ours
    can ask for them; nor do they leave a trace elsewhere (the assisted generation mode is computed
    from ``assistant_model`` but not stored; the streamer has only been given the prompt).
    Without them an assistant would be silently ignored instead of refused, and a streamer would
    get the prompt and then nothing, not even ``end()``.

    So they are taken from where they are passed when transformers passes them (``kwargs``: a
    future version, or a caller naming them), and otherwise read from the local variables of the
    ``GenerationMixin.generate`` frame that called us, found by its code object a few frames up
    (``generate`` calls the loop directly; only ``torch.no_grad`` and this module sit between).
    Only these two names are read; nothing in that frame is changed.
    """
    found = {name: kwargs[name] for name in _DROPPED if kwargs.get(name) is not None}
    if len(found) == len(_DROPPED):
        return found
    target = inspect.unwrap(GenerationMixin.generate).__code__
    frame = sys._getframe(1)
    for _ in range(8):  # this module's own frames, then generate()'s
        if frame is None:
            break
        if frame.f_code is target:
            caller = frame.f_locals
            return {name: found.get(name, caller.get(name)) for name in _DROPPED}
        frame = frame.f_back
    return found


def _is_decoding_loop_call(args: tuple, kwargs: dict) -> bool:
    return (
        len(args) == 1
        and not any(key in kwargs for key in _HUB_ONLY_KEYS)
        and isinstance(kwargs.get("logits_processor"), LogitsProcessorList)
        and isinstance(kwargs.get("stopping_criteria"), StoppingCriteriaList)
        and isinstance(kwargs.get("generation_config"), GenerationConfig)
    )


def generate(model, *args, lacache_method: str = "lacache", lacache_budget: int = 256, lacache_options=None, **kwargs):
    """Generate with a fresh lacache cache: ``model.generate(..., custom_generate=lacache.generate)``.

    Args:
        model: the causal LM (transformers passes it as the first argument).
        lacache_method: a name from ``lacache.METHODS`` (``lacache``, ``streaming``, ``lacache-salient``, ``tova``,
            ``h2o``, ``knorm`` or ``full``).
        lacache_budget: slots per layer (ignored by ``full``).
        lacache_options: dict of extra options for the method's ``from_model`` (e.g. ``{"sinks": 64}``).
        **kwargs: everything else ``generate()`` takes (``max_new_tokens``, ``do_sample``, ...).

    Returns what ``generate()`` returns. A new cache is built for every call, so consecutive calls
    (and consecutive pipeline prompts) never share state. Bad method names, budgets or options raise
    the registry's ``ValueError``; ``assistant_model`` / ``prompt_lookup_num_tokens`` raise ``ValueError``.
    With a callable ``custom_generate`` the cache is not returned (pass ``cache=`` to ``model.generate``
    yourself to inspect it afterwards).

    To publish this on the hub, put ``from lacache.cache.hub_generate import generate`` in
    ``custom_generate/generate.py`` and ``lacache`` in ``custom_generate/requirements.txt`` of a model
    repo; users then call ``model.generate(ids, custom_generate="you/repo", trust_remote_code=True,
    lacache_budget=256)``. See docs/custom_generate.md.
    """
    options = _options(lacache_options, lacache_method)
    if _is_decoding_loop_call(args, kwargs):
        return _decoding_loop(model, args[0], lacache_method, lacache_budget, options, kwargs)
    return _whole_generate(model, args, lacache_method, lacache_budget, options, kwargs)


def _decoding_loop(model, input_ids, method, budget, options, kwargs):
    """Callable contract: ``generate()`` prepared everything; swap in our cache and run its loop."""
    dropped = _dropped_by_generate(kwargs)
    generation_config = kwargs["generation_config"]
    _refuse_assisted(generation_config, kwargs, dropped.get("assistant_model"))
    mode = generation_config.get_generation_mode()
    if mode in (GenerationMode.SAMPLE, GenerationMode.BEAM_SAMPLE):
        _check_top_p(generation_config.top_p)
    if mode not in _LOOP_MODES:
        raise ValueError(
            f"lacache.generate supports greedy search, sampling and beam search; got generation mode {mode.value!r}"
        )
    key = next(iter(cache_argument(model, None)))  # "cache", or "past_key_values" before transformers renamed it
    if key not in kwargs or not kwargs.get("use_cache", True):
        raise ValueError("lacache.generate needs use_cache=True: the cache is what lacache bounds")
    if isinstance(kwargs[key], BoundedCache):
        raise ValueError(
            "pass either cache=<a lacache cache> or custom_generate=lacache.generate, not both "
            "(custom_generate builds its own cache from lacache_method/lacache_budget)"
        )
    kwargs[key] = make_cache(method, model, budget, **options)
    streamer = dropped.get("streamer")
    if streamer is not None:
        if mode in (GenerationMode.BEAM_SEARCH, GenerationMode.BEAM_SAMPLE):
            raise ValueError("`streamer` cannot be used with beam search (yet!). Make sure that `num_beams` is set to 1.")
        kwargs["streamer"] = streamer
    loop = getattr(type(model), GENERATION_MODES_MAPPING[mode])
    return loop(model, input_ids, **kwargs)


def _whole_generate(model, args, method, budget, options, kwargs):
    """Hub contract (or a direct call): run the standard ``generate`` with a fresh cache."""
    _refuse_assisted(kwargs.get("generation_config"), kwargs)
    _check_top_p(kwargs.get("top_p"))
    if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
        raise ValueError(
            "pass either cache=<a cache> or lacache.generate, not both (lacache.generate builds its own cache)"
        )
    kwargs.pop("cache", None)
    kwargs.pop("past_key_values", None)
    kwargs.pop("custom_generate", None)
    kwargs.pop("trust_remote_code", None)
    kwargs = {k: v for k, v in kwargs.items() if not (k == "assistant_model" and v is None)}
    cache = make_cache(method, model, budget, **options)
    return GenerationMixin.generate(model, *args, **cache_argument(model, cache), **kwargs)
