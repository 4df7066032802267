"""Run by test_vllm_hooks.py in a fresh process (lacache installed, so vLLM runs its register()):
an in-process engine WITHOUT the lacache key, then one with it. After each, prints one line
``STATE <json>``: which of vLLM's classes hold lacache code, what lacache put in vLLM's KV-spec
registry, the classes the engine built, and any lacache state on its model runner."""

import json
import os
import sys
from pathlib import Path

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the whole engine in this process: it can be inspected

import lacache  # noqa: E402

LACACHE_DIR = str(Path(lacache.__file__).resolve().parent)


def _is_lacache(value) -> bool:
    """True for code written in lacache, even behind functools.wraps (which copies vLLM's names)."""
    func = getattr(value, "__func__", value)
    code = getattr(func, "__code__", None)
    return code is not None and str(Path(code.co_filename).resolve()).startswith(LACACHE_DIR)


def _vllm_classes() -> dict:
    from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
    from vllm.v1.engine.input_processor import InputProcessor
    from vllm.v1.kv_cache_interface import FullAttentionSpec
    from vllm.v1.worker.block_table import BlockTable
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.cpu_worker import CPUWorker
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.gpu_worker import Worker

    return {cls.__name__: cls for cls in (EngineArgs, AsyncEngineArgs, Scheduler, KVCacheManager, FullAttentionManager,
                                          FullAttentionSpec, BlockTable, GPUModelRunner, CPUModelRunner, Worker,
                                          CPUWorker, InputProcessor)}


def state(llm) -> dict:
    from vllm.v1 import kv_cache_spec_registry as registry

    core = llm.llm_engine.engine_core.engine_core
    worker = core.model_executor.driver_worker.worker
    runner = worker.model_runner
    patched = {name: sorted(attr for attr, value in vars(cls).items() if _is_lacache(value))
               for name, cls in _vllm_classes().items()}
    registered = sorted(f"{spec.__module__}.{spec.__name__}->{meta.manager_class.__module__}.{meta.manager_class.__name__}"
                        for spec, meta in registry._REGISTRY_KVCACHESPEC_LIST.items()
                        if "lacache" in spec.__module__ or "lacache" in meta.manager_class.__module__)
    config = llm.llm_engine.vllm_config
    return {
        "patched": {name: attrs for name, attrs in patched.items() if attrs},
        "registered": registered,
        "scheduler": type(core.scheduler).__qualname__,
        "worker": type(worker).__qualname__,
        "runner": type(runner).__qualname__,
        "runner_state": sorted(name for name in vars(runner) if "lacache" in name),
        "scheduler_cls": config.scheduler_config.scheduler_cls,
        "worker_cls": config.parallel_config.worker_cls,
        "prefix_caching": config.cache_config.enable_prefix_caching,
        "engine_modules": sorted(m for m in sys.modules if m.startswith("lacache.vllm.") and m not in
                                 ("lacache.vllm.config", "lacache.vllm.plugin")),
    }


def main() -> None:
    from vllm import LLM, SamplingParams

    from lacache import load_model
    from lacache.lab.models import default_model_dir

    load_model(None)  # converts the bundled model once if needed
    engines = []  # kept alive: tearing an engine down in-process breaks the next one's process groups
    for extra in ({}, {"lacache": {"budget": 64}}):
        llm = LLM(model=str(default_model_dir()), dtype="float32", enforce_eager=True, max_model_len=512,
                  gpu_memory_utilization=0.3, num_gpu_blocks_override=8, max_num_batched_tokens=128,
                  additional_config=extra)
        engines.append(llm)
        out = llm.generate(["Once upon a time"], SamplingParams(max_tokens=8, min_tokens=8, temperature=0))
        print("STATE", json.dumps({"tokens": len(out[0].outputs[0].token_ids), **state(llm)}), flush=True)


if __name__ == "__main__":
    main()
