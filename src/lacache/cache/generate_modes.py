"""Which of transformers' ``generate()`` modes a bounded cache serves; the check the decoder hook makes.

transformers 5 runs greedy search, sampling, beam search and beam sampling in its own loops
(``GenerationMixin._sample`` / ``_beam_search``), which drive a bounded cache exactly (the support
matrix, ``lacache.support``, names the tests). Two kinds of mode cannot be served, and are refused
before the cache stores anything:

* **assisted / speculative decoding** (``assistant_model``, ``prompt_lookup_num_tokens``,
  ``assistant_early_exit``, ``use_mtp``: mode ``assisted_generation``): the model's forward over
  the drafts must be cropped back to the accepted ones, and a bounded cache may already have
  evicted, to make room for the drafts, tokens it cannot restore;
* **the modes transformers 5 moved to hub code** (contrastive search, DoLa, group (diverse) beam
  search, constrained beam search: ``GENERATION_MODES_MAPPING`` names a ``transformers-community``
  repository for each): code downloaded at run time, which lacache can neither read nor test,
  would drive the cache.

``generate()`` never tells the cache its mode, so the model's decoder hook (``cache.attach``) reads
it, before every uncompiled forward with a bounded cache, from the ``GenerationMixin.generate``
calls running that forward: their ``generation_mode`` local (computed before any forward, also
when generate hands a hub mode over to its repository) and their ``custom_generate`` argument (a
hub mode's repository called by name). Only these two names are read; nothing in a frame is changed.
Compiled decode steps skip the check: every ``generate()`` call starts with an uncompiled pass.
"""

from __future__ import annotations

import inspect
import sys

__all__ = ["generate_mode_refusal"]

_GENERATE_CODE = None


def _generate_code():
    global _GENERATE_CODE
    if _GENERATE_CODE is None:
        from transformers.generation import GenerationMixin

        _GENERATE_CODE = inspect.unwrap(GenerationMixin.generate).__code__
    return _GENERATE_CODE


def _hub_modes() -> dict:
    """``{mode: repository}`` for the modes transformers runs from the hub (read at each call)."""
    from transformers.generation import utils

    return {mode: repo for mode, repo in utils.GENERATION_MODES_MAPPING.items() if "/" in repo}


def _refusal(mode, repo: str | None, cache_name: str) -> str:
    from transformers.generation.configuration_utils import GenerationMode

    if mode == GenerationMode.ASSISTED_GENERATION:
        return (
            f"generate() mode 'assisted_generation' (assistant_model, prompt_lookup_num_tokens, assistant_early_exit "
            f"or use_mtp) cannot use a bounded {cache_name}: drafts the model rejects must be cropped out of the cache, "
            "and a bounded cache cannot restore what it evicted; generate without them (greedy, sampling or beam search)"
        )
    name = mode.name.replace("_", " ").lower()
    return (
        f"generate() mode {mode.value!r} ({name}) cannot use a bounded {cache_name}: transformers runs it from hub code "
        f"({repo}) that lacache cannot check; use greedy search, sampling or beam search (num_beams>1, do_sample) "
        f"with this cache, or a DynamicCache for {name}"
    )


def generate_mode_refusal(cache_name: str) -> str | None:
    """Why the ``generate()`` call running the current forward cannot use a bounded cache, or None.

    Walks the Python stack once (a few microseconds); a forward outside ``generate()`` finds nothing.
    """
    from transformers.generation.configuration_utils import GenerationMode

    code = _generate_code()
    frame = sys._getframe(1)
    hub = None
    while frame is not None:
        if frame.f_code is code:
            if hub is None:
                hub = _hub_modes()
            local = frame.f_locals
            mode = local.get("generation_mode")
            if mode == GenerationMode.ASSISTED_GENERATION or mode in hub:
                return _refusal(mode, hub.get(mode), cache_name)
            repo = local.get("custom_generate")
            if isinstance(repo, str):
                for hub_mode, hub_repo in hub.items():
                    if repo == hub_repo:
                        return _refusal(hub_mode, hub_repo, cache_name)
        frame = frame.f_back
    return None
