"""The scheduler half of the vLLM plugin: block accounting for requests that hold a bounded cache.

vLLM sizes a request's block row by its logical length. A bounded request holds only ``slots``
physical slots, so:

* ``LadderAttentionSpec`` marks the model's attention layers as bounded and tells the start-up
  check that a request needs ``budget + max_num_batched_tokens`` slots at most, not
  ``max_model_len`` (so an engine starts with a pool smaller than one full-length request);
* ``LadderManager`` replays each request's passes through the same retention rule as the workers
  (``RequestSlots``), sizes allocations by physical slots, and returns the tail blocks a
  compaction emptied to the pool before each allocation, so the scheduler admits more requests.

Both sides drop the same tail blocks (whole blocks past the held slots), so the worker's block
rows stay equal to the scheduler's without any message between them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields

from vllm.utils.math_utils import cdiv
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec

from .config import ServingConfig, serving_config
from .slots import RequestSlots

__all__ = ["LadderAttentionSpec", "LadderManager", "install", "bounded_specs"]

logger = logging.getLogger("lacache.vllm")

#: the engine config of the scheduler being built in this process (set around Scheduler.__init__)
_ACTIVE: dict = {}


@dataclass(frozen=True, kw_only=True)
class LadderAttentionSpec(FullAttentionSpec):
    """Full attention over a bounded number of slots per request (fields as FullAttentionSpec)."""

    def max_memory_usage_bytes(self, vllm_config) -> int:
        config = serving_config(vllm_config)
        if config is None:
            return super().max_memory_usage_bytes(vllm_config)
        step = min(vllm_config.scheduler_config.max_num_batched_tokens, vllm_config.model_config.max_model_len)
        return cdiv(config.capacity + step, self.block_size) * self.page_size_bytes


def bounded_specs(specs: dict) -> dict:
    """The worker's KV specs with every full-attention layer marked bounded; other kinds are refused."""
    out = {}
    for name, spec in specs.items():
        if type(spec) is not FullAttentionSpec:
            raise ValueError(
                f"lacache: layer {name} uses {type(spec).__name__}; bounded serving supports models whose layers "
                "are all plain full attention (e.g. Llama, Qwen2, Mistral without sliding window), not "
                "sliding-window, hybrid or MLA models"
            )
        out[name] = LadderAttentionSpec(**{f.name: getattr(spec, f.name) for f in fields(spec) if f.init})
    return out


class LadderManager(FullAttentionManager):
    """Full-attention block accounting by physical slots, with the blocks compaction empties freed."""

    def __init__(self, kv_cache_spec, **kwargs):
        super().__init__(kv_cache_spec, **kwargs)
        config: ServingConfig | None = _ACTIVE.get("config")
        if config is None:
            raise RuntimeError("lacache: LadderManager built outside a scheduler with a lacache config")
        self.config = config
        self.step_cap = _ACTIVE["step_cap"]
        self.slots: dict[str, RequestSlots] = {}

    def _request(self, request_id: str) -> RequestSlots:
        slots = self.slots.get(request_id)
        if slots is None:
            cfg = self.config
            slots = self.slots[request_id] = RequestSlots(cfg.new_policy(), cfg.budget, cfg.target, cfg.num_layers)
        return slots

    def _physical(self, request_id: str, num_tokens: int) -> int:
        slots = self.slots.get(request_id)
        evicted = slots.evicted if slots is not None else 0
        return max(0, min(num_tokens - evicted, self.config.capacity + self.step_cap))

    def get_num_blocks_to_allocate(self, request_id, num_tokens, new_computed_blocks, total_computed_tokens,
                                   num_local_computed_tokens, num_tokens_main_model, *args, **kwargs) -> int:
        return super().get_num_blocks_to_allocate(
            request_id, self._physical(request_id, num_tokens), new_computed_blocks, total_computed_tokens,
            num_local_computed_tokens, self._physical(request_id, num_tokens_main_model), *args, **kwargs)

    def allocate_new_blocks(self, request_id, num_tokens, num_tokens_main_model, *args, **kwargs):
        return super().allocate_new_blocks(request_id, self._physical(request_id, num_tokens),
                                           self._physical(request_id, num_tokens_main_model), *args, **kwargs)

    def remove_skipped_blocks(self, request_id, processed_computed_tokens, *args, **kwargs) -> None:
        """Replay the passes the workers ran since the last call; free the blocks they emptied."""
        slots = self._request(request_id)
        if processed_computed_tokens < slots.seen:  # preempted and recomputed from scratch
            slots = self.slots[request_id] = RequestSlots(self.config.new_policy(), self.config.budget,
                                                          self.config.target, self.config.num_layers)
        slots.advance(processed_computed_tokens - slots.seen)
        blocks = self.req_to_blocks.get(request_id)
        keep = cdiv(slots.slots, self.block_size)
        if blocks is not None and len(blocks) > keep:
            emptied = blocks[keep:]
            del blocks[keep:]
            self.block_pool.free_blocks(reversed(emptied))

    def pop_blocks_for_free(self, request_id):
        self.slots.pop(request_id, None)
        return super().pop_blocks_for_free(request_id)


def _scheduler_init(original):
    def __init__(self, *args, **kwargs):
        vllm_config = kwargs.get("vllm_config", args[0] if args else None)
        config = serving_config(vllm_config) if vllm_config is not None else None
        if config is not None:
            cache = vllm_config.cache_config
            if cache.enable_prefix_caching:
                logger.warning("lacache: prefix caching switched off: compaction rewrites blocks that prefix caching "
                               "would share between requests")
                cache.enable_prefix_caching = False
            _ACTIVE.update(config=config, step_cap=int(vllm_config.scheduler_config.max_num_batched_tokens))
            logger.info("lacache: bounded KV cache on: %s", config.describe())
        original(self, *args, **kwargs)

    __init__._lacache_wrapped = True
    return __init__


def install() -> None:
    """Register the bounded spec and its manager; wrap the scheduler's constructor (once per process)."""
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(LadderAttentionSpec, LadderManager, uniform_type_base_spec=FullAttentionSpec)
    if not getattr(Scheduler.__init__, "_lacache_wrapped", False):
        Scheduler.__init__ = _scheduler_init(Scheduler.__init__)
