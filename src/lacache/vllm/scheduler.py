"""The scheduler half of the vLLM plugin: block accounting for requests that hold a bounded cache.

vLLM sizes a request's block row by its logical length. A bounded request holds only ``slots``
physical slots, so:

* ``LadderAttentionSpec`` marks the model's attention layers as bounded and tells the start-up
  check that a request needs its peak row at most (``ServingConfig.peak_slots``: ``budget + 1``
  for a rule with compaction points, ``capacity + max_num_batched_tokens`` for the authors'
  schedule), not ``max_model_len`` (so an engine starts with a pool smaller than one full-length
  request);
* ``LadderScheduler`` (``plugin``) stops every request's pass at its next compaction point
  (``policies.points``), so what a request's cache holds depends on its tokens alone, never on
  how a busy engine chunked them;
* ``LadderManager`` replays each request's passes through the same retention rule as the workers
  (``RequestSlots``), sizes allocations by physical slots, and returns the tail blocks a
  compaction emptied to the pool before each allocation, so the scheduler admits more requests.

Admission is by each request's known peak: a decode pass needs ``capacity + 1`` slots (the held
slots and the token being computed), or fewer when the request's whole length
(``prompt + max_tokens``) is shorter. That row is allocated when the request is admitted and never
freed while it runs, so a running request never asks for a block mid-decode, and vLLM never has to
preempt (and recompute from token 0) to find one. Only the blocks a long prefill chunk needs above
that row come and go. Both sides drop the same tail blocks (whole blocks past
``max(held slots, decode row)``, computed from the row's own length), so the worker's block rows
stay equal to the scheduler's without any message between them. ``lacache.vllm.plugin``
registers the spec with its manager and binds each manager to the engine's settings; this module
only imports vLLM's base classes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, fields

from vllm.utils.math_utils import cdiv
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec

from .config import ServingConfig, serving_config
from .slots import KeptRequest, RequestSlots, kept_blocks, longest_kept_prefix

__all__ = ["LadderAttentionSpec", "LadderManager", "bounded_specs"]


@dataclass(frozen=True, kw_only=True)
class LadderAttentionSpec(FullAttentionSpec):
    """Full attention over a bounded number of slots per request (fields as FullAttentionSpec)."""

    def max_memory_usage_bytes(self, vllm_config) -> int:
        config = serving_config(vllm_config)
        if config is None:
            return super().max_memory_usage_bytes(vllm_config)
        step = min(vllm_config.scheduler_config.max_num_batched_tokens, vllm_config.model_config.max_model_len)
        return cdiv(config.peak_slots(step), self.block_size) * self.page_size_bytes


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
    """Full-attention block accounting by physical slots, with the blocks compaction empties freed.

    vLLM builds managers from the spec alone; the scheduler that built it hands over the engine's
    settings with ``bind`` before the first request.
    """

    def __init__(self, kv_cache_spec, **kwargs):
        super().__init__(kv_cache_spec, **kwargs)
        self.config: ServingConfig | None = None
        self.step_cap = 0
        self.max_model_len = 0
        self.slots: dict[str, RequestSlots] = {}
        self._lookup: Callable[[str], object] = lambda request_id: None
        #: finished requests' caches, oldest first (``reuse``): evicted when an allocation needs their blocks
        self.kept: OrderedDict[str, KeptRequest] = OrderedDict()
        #: adoptions of this scheduler step, final once it admitted the request: request id -> (key, entry)
        self.adopting: dict[str, tuple[str, KeptRequest]] = {}
        self.reused_requests = 0
        self.reused_tokens = 0

    def bind(self, config: ServingConfig, step_cap: int, max_model_len: int,
             lookup: Callable[[str], object] | None = None) -> None:
        """The engine's settings: the most tokens one step schedules (``max_num_batched_tokens``), the
        longest request, and how to find a request by id (the scheduler's ``requests.get``) to read
        its prompt length and ``max_tokens``."""
        self.config = config
        self.step_cap = int(step_cap)
        self.max_model_len = int(max_model_len)
        if lookup is not None:
            self._lookup = lookup

    def decode_slots(self, request_id: str) -> int:
        """The request's peak row while decoding: ``capacity + 1``, or its whole length if shorter."""
        peak = self._settings().decode_slots
        request = self._lookup(request_id)
        if request is not None:
            length = int(request.num_prompt_tokens) + int(request.max_tokens)
            if self.max_model_len:
                length = min(length, self.max_model_len)
            peak = min(peak, length)
        return peak

    def _settings(self) -> ServingConfig:
        if self.config is None:
            raise RuntimeError("lacache: LadderManager used before its scheduler bound it to the engine's settings; "
                               "it is built by lacache.vllm.plugin.LadderScheduler (scheduler_cls), not on its own")
        return self.config

    def _request(self, request_id: str) -> RequestSlots:
        slots = self.slots.get(request_id)
        if slots is None:
            slots = self.slots[request_id] = self._fresh()
        return slots

    def _fresh(self) -> RequestSlots:
        return self._settings().new_slots()

    def _physical(self, request_id: str, num_tokens: int) -> int:
        """Slots the row must have for ``num_tokens`` logical tokens: the physical ones, and at least the
        request's decode row (reserved at admission, so decoding never needs another block)."""
        slots = self.slots.get(request_id)
        evicted = slots.evicted if slots is not None else 0
        need = max(0, min(num_tokens - evicted, self._settings().peak_slots(self.step_cap)))
        return max(need, self.decode_slots(request_id)) if need else 0

    def get_num_blocks_to_allocate(self, request_id, num_tokens, new_computed_blocks, total_computed_tokens,
                                   num_local_computed_tokens, num_tokens_main_model, *args, **kwargs) -> int:
        need = super().get_num_blocks_to_allocate(
            request_id, self._physical(request_id, num_tokens), new_computed_blocks, total_computed_tokens,
            num_local_computed_tokens, self._physical(request_id, num_tokens_main_model), *args, **kwargs)
        # kept caches give way to any request that needs their blocks (vLLM checks the free count next)
        while self.kept and need > self.block_pool.get_num_free_blocks():
            self.evict_oldest()
        return need

    def allocate_new_blocks(self, request_id, num_tokens, num_tokens_main_model, *args, **kwargs):
        return super().allocate_new_blocks(request_id, self._physical(request_id, num_tokens),
                                           self._physical(request_id, num_tokens_main_model), *args, **kwargs)

    def remove_skipped_blocks(self, request_id, processed_computed_tokens, *args, **kwargs) -> None:
        """Replay the passes the workers ran since the last call; free the blocks they emptied."""
        slots = self._request(request_id)
        if processed_computed_tokens < slots.seen:  # preempted and recomputed from scratch
            slots = self.slots[request_id] = self._fresh()
        slots.advance(processed_computed_tokens - slots.seen)
        blocks = self.req_to_blocks.get(request_id)
        if blocks is None:
            return
        keep = kept_blocks(slots.slots, len(blocks), self.decode_slots(request_id), self.block_size)
        if len(blocks) > keep:
            emptied = blocks[keep:]
            del blocks[keep:]
            self.block_pool.free_blocks(reversed(emptied))

    def _keepable(self, request) -> bool:
        """Whether a request's keys depend on its token ids alone (no images, no prompt embeddings)."""
        return not request.mm_features and request.prompt_embeds is None

    def pop_blocks_for_free(self, request_id):
        """A request leaves: its blocks go back to the pool, or, when it finished and ``reuse`` is on, they
        are kept (with its retention state) for a request whose prompt continues its token stream."""
        request = self._lookup(request_id)
        config = self.config
        keep = (config is not None and config.reuse and request is not None and request.is_finished()
                and request_id in self.slots and request.num_computed_tokens > 0 and self._keepable(request))
        if keep:  # replay the last passes (no allocation followed them) and drop the blocks they emptied
            self.remove_skipped_blocks(request_id, request.num_computed_tokens)
        slots = self.slots.pop(request_id, None)
        blocks = super().pop_blocks_for_free(request_id)
        if keep and blocks and slots is not None and slots.seen == request.num_computed_tokens:
            self.kept[request_id] = KeptRequest(list(request.all_token_ids[: slots.seen]), blocks, slots,
                                                _context(request))
            return []
        return blocks

    def evict_oldest(self) -> None:
        """Give the oldest kept cache's blocks back to the pool."""
        _, entry = self.kept.popitem(last=False)
        self.block_pool.free_blocks(reversed(entry.blocks))

    def evict_all(self) -> int:
        """Give every kept cache's blocks back to the pool (``reset_prefix_cache``: after a weight update no
        kept KV may be continued). Returns how many were dropped."""
        dropped = len(self.kept)
        while self.kept:
            self.evict_oldest()
        return dropped

    def kept_blocks(self) -> int:
        """Blocks held by kept caches (the ``lacache_kept_blocks`` gauge)."""
        return sum(len(entry.blocks) for entry in self.kept.values())

    def adopt(self, request) -> int:
        """As ``request`` is admitted (vLLM's prefix-cache look-up for a waiting request): if a kept cache's
        stream is a prefix of its prompt, the request takes that cache's blocks and state and starts
        computing after it. Returns the tokens reused (0: none).

        The adoption is provisional until the scheduler's step ends (``settle_adoptions``): a request that
        was then not admitted after all (the pool had no room for the rest of its row) gives the cache
        back, so a waiting request never holds blocks."""
        config = self.config
        if config is None or not config.reuse or not self.kept or request.num_computed_tokens:
            return 0
        if request.request_id in self.adopting:  # looked up again in the same step
            return len(self.adopting[request.request_id][1].tokens)
        # a request that must not read a prefix cache (vLLM's rule: e.g. it asks for prompt logprobs, which
        # only a full prefill computes) and requests whose keys depend on more than token ids never adopt
        if request.skip_reading_prefix_cache or not self._keepable(request):
            return 0
        entry = longest_kept_prefix(list(self.kept.values()), request.prompt_token_ids or (), _context(request))
        if entry is None:
            return 0
        key = next(key for key, value in self.kept.items() if value is entry)
        del self.kept[key]
        self.adopting[request.request_id] = (key, entry)
        self.req_to_blocks[request.request_id] = entry.blocks
        self.slots[request.request_id] = entry.slots
        return len(entry.tokens)

    def settle_adoptions(self, admitted: set[str]) -> None:
        """After a scheduler step: adoptions by requests it admitted are final; the others give their kept
        cache back (as it was, newest), so nothing waiting holds blocks."""
        for request_id, (key, entry) in list(self.adopting.items()):
            del self.adopting[request_id]
            if request_id in admitted:
                self.reused_requests += 1
                self.reused_tokens += len(entry.tokens)
                continue
            self.req_to_blocks.pop(request_id, None)
            self.slots.pop(request_id, None)
            self.kept[key] = entry


def _context(request) -> tuple:
    """What a request's keys and values depend on besides its tokens: its LoRA adapter, and its cache salt
    (which vLLM's prefix caching also keys on, so that users who set different salts never share KV).

    Read as attributes of vLLM's ``Request`` with no default: should vLLM rename them, this fails loudly
    instead of silently letting tenants share caches."""
    lora = request.lora_request
    return (None if lora is None else lora.lora_int_id, request.cache_salt)
