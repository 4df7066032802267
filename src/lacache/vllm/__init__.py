"""LaCache inside vLLM: a plugin that keeps every request within its ladder budget in the paged KV cache.

Installed with the package and found by vLLM through the ``vllm.general_plugins`` entry point;
it acts only for engines started with ``additional_config={"lacache": {...}}`` (see
``lacache.vllm.config``). ``register()`` runs in every vLLM process and only installs hooks;
each hook reads the engine's own config and does nothing without the ``lacache`` key.
"""

from __future__ import annotations

import functools
import logging

from .config import KEY, SERVED_METHODS, ServingConfig, parse_config, serving_config

__all__ = ["register", "KEY", "SERVED_METHODS", "ServingConfig", "parse_config", "serving_config"]

logger = logging.getLogger("lacache.vllm")
_REGISTERED = False


def _wrap(cls, name: str, after):
    """Run ``after(self, result, *args)`` once ``cls.name`` returns; a non-None answer replaces the result."""
    original = getattr(cls, name)
    if getattr(original, "_lacache_wrapped", False):
        return

    @functools.wraps(original)
    def wrapper(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        replaced = after(self, result, *args, **kwargs)
        return result if replaced is None else replaced

    wrapper._lacache_wrapped = True
    setattr(cls, name, wrapper)


def _worker_state(runner):
    config = serving_config(runner.vllm_config)
    if config is None:
        return None
    from .worker import attach

    return attach(runner, config)


def _after_prepare_inputs(runner, result, scheduler_output, num_scheduled_tokens):
    state = _worker_state(runner)
    if state is not None:
        state.after_prepare_inputs(num_scheduled_tokens)


def _after_execute_model(runner, result, *args, **kwargs):
    state = _worker_state(runner)
    if state is not None:
        state.after_execute_model()


def _after_update_states(runner, result, scheduler_output, *args, **kwargs):
    state = _worker_state(runner)
    if state is not None:
        state.forget(scheduler_output.finished_req_ids)


def _bounded_kv_spec(runner, specs, *args, **kwargs):
    """At engine start: mark the layers bounded, and refuse a model the plugin cannot serve (no RoPE,
    interleaved RoPE, sliding-window / hybrid / MLA layers) before any request arrives."""
    if serving_config(runner.vllm_config) is None:
        return specs
    from .scheduler import bounded_specs

    bounded = bounded_specs(specs)
    _worker_state(runner)
    return bounded


def register() -> None:
    """vLLM's plugin hook: install lacache's hooks once per process (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    _wrap(GPUModelRunner, "_update_states", _after_update_states)
    _wrap(GPUModelRunner, "_prepare_inputs", _after_prepare_inputs)
    _wrap(GPUModelRunner, "execute_model", _after_execute_model)
    _wrap(GPUModelRunner, "get_kv_cache_spec", _bounded_kv_spec)
    from . import scheduler

    scheduler.install()
    _REGISTERED = True
