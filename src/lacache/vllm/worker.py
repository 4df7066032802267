"""The worker half of the vLLM plugin: physical slots, and compaction of the paged keys and values.

vLLM addresses a request's KV by *logical* position (token ``p`` lives in slot ``p`` of the
request's block row). With a bounded cache a request holds only ``slots`` physical slots; the
plugin keeps, per request, the ``RequestSlots`` replay of the retention rule and, around each step:

* after ``_prepare_inputs``: every new token's position, KV slot and the request's sequence
  length are shifted from logical to physical (``position - evicted``). Keys are thus rotated by
  their slot, as lacache's position shift wants, and written right after the held slots;
* after ``execute_model``: each request advances by the tokens it ran; when it overflows its
  budget, every layer's kept slots are gathered, re-rotated by ``new slot - old slot`` (keys are
  stored after RoPE) and written to the front of the row with the backend's own writer; the row's
  tail blocks are dropped, as the scheduler's ``LadderManager`` frees them. A rule that reads keys
  is handed each layer's key statistic (``RetentionPolicy.key_statistic``), read from the paged
  keys at compaction time, never per token: for the key norm (key-norm, the salient and group
  ladders) only the slots written since the request's last compaction are read, the older ones were
  kept from earlier compactions (a rotation leaves a norm unchanged); a statistic relative to the
  layer's other keys (KeyDiff) reads every held slot again, each at its slot's position.

``lacache.vllm.plugin`` calls these from its model runner (``LadderModelRunner``); this module
imports no vLLM.
"""

from __future__ import annotations

import itertools
import os
import time
import weakref

import torch

from ..rope import rotate_half
from . import metrics
from .config import ServingConfig
from .paged import PagedKV
from .slots import RequestSlots, kept_blocks

__all__ = ["WorkerState", "states"]

#: live worker states of this process (tests read kept tokens through them)
_STATES: "weakref.WeakSet[WorkerState]" = weakref.WeakSet()
_CREATED = itertools.count()


def states() -> list["WorkerState"]:
    """Live worker states of this process, oldest first."""
    return sorted(_STATES, key=lambda state: state.created)


def _rotary_module(model: torch.nn.Module):
    found = [m for m in model.modules() if hasattr(m, "cos_sin_cache") and hasattr(m, "rotary_dim")]
    if not found:
        raise ValueError("lacache: this model has no rotary position embedding; the position shift needs RoPE")
    first = found[0]
    for other in found[1:]:
        if other.rotary_dim != first.rotary_dim or not torch.equal(other.cos_sin_cache, first.cos_sin_cache):
            raise ValueError("lacache: layers with different rotary frequencies are not served in vLLM yet")
    if not getattr(first, "is_neox_style", True):
        raise ValueError("lacache: interleaved (GPT-J style) RoPE is not supported; rotate-half models only")
    return first


def _pure_rotations(table: torch.Tensor) -> torch.Tensor:
    """vLLM's ``[positions, rotary_dim]`` table (cos half, then sin half) as pure rotations.

    Some scalings fold a magnitude into the table: YaRN multiplies cos and sin by its attention factor
    (``mscale``), which the model applies once when it rotates a new key. Turning an already-rotated
    key by a position delta must not apply it again, so each (cos, sin) pair is divided by its own
    length, which leaves the angle and drops any factor (a no-op for plain RoPE, linear and llama3)."""
    half = table.shape[-1] // 2
    cos, sin = table[:, :half], table[:, half:]
    norm = torch.sqrt(cos * cos + sin * sin)
    return torch.cat([cos / norm, sin / norm], dim=-1)


class WorkerState:
    """Everything the plugin keeps on one model runner."""

    def __init__(self, runner, config: ServingConfig, mean_over_ranks=None):
        self.runner = runner
        self.config = config
        #: under tensor parallel, ``[layers, k]`` head-averaged key statistics of this rank's heads -> the mean
        #: over every rank's (one all-reduce per compaction); None on one device
        self.mean_over_ranks = mean_over_ranks
        self.requests: dict[str, RequestSlots] = {}
        self.finished: dict[str, RequestSlots] = {}  # kept for inspection when LACACHE_VLLM_RECORD=1
        #: finished requests' states by the first block of their row (``reuse``): the scheduler keeps their
        #: blocks, and a new request whose row starts with that block continues that state. The scheduler
        #: keeps or evicts a row as a whole and never trims its first block, so that block names it.
        self.kept: dict[int, RequestSlots] = {}
        self.reused_requests = 0
        self.record = os.environ.get("LACACHE_VLLM_RECORD") == "1"
        self.step: list[tuple[str, int]] = []
        rotary = _rotary_module(runner.model)
        self.rotary_dim = int(rotary.rotary_dim)
        self.angles = _pure_rotations(rotary._compute_cos_sin_cache().to(torch.float32))  # [positions, rotary_dim]
        self._paged: PagedKV | None = None
        self.layer_numbers: list[int] = []  # the model's number of each local attention layer (set with the pages)
        self.compactions = 0
        self.compaction_seconds = 0.0  # wall time inside compaction (benchmarks read it)
        self.created = next(_CREATED)
        _STATES.add(self)

    # ------------------------------------------------------------------ per step
    def _slots_for(self, req_id: str, logical_start: int) -> RequestSlots:
        slots = self.requests.get(req_id)
        if slots is None or logical_start < slots.seen:  # new, or preempted and recomputed from scratch
            cfg = self.config
            # the original index of every slot costs a copy per step: kept only when inspection asks for it
            slots = cfg.new_slots(track_tokens=self.record)
            self.requests[req_id] = slots
        if logical_start != slots.seen:
            raise RuntimeError(f"lacache: request {req_id} resumes at token {logical_start} but its cache holds "
                               f"{slots.seen}; prefix caching must be off for bounded requests")
        return slots

    def after_prepare_inputs(self, num_scheduled_tokens) -> None:
        """Shift this step's positions, slot mapping and sequence lengths from logical to physical."""
        runner = self.runner
        batch = runner.input_batch
        num_reqs = batch.num_reqs
        logical = batch.num_computed_tokens_cpu[:num_reqs]
        evicted = torch.zeros(num_reqs, dtype=torch.int64)
        self.step = []
        for i, req_id in enumerate(batch.req_ids[:num_reqs]):
            slots = self._slots_for(req_id, int(logical[i]))
            evicted[i] = slots.evicted
            self.step.append((req_id, int(num_scheduled_tokens[i])))
        if not bool(evicted.any()):
            return
        counts = torch.as_tensor(num_scheduled_tokens[:num_reqs], dtype=torch.int64)
        total = int(counts.sum())
        per_token = torch.repeat_interleave(evicted, counts).to(runner.positions.device)
        runner.positions[:total] -= per_token
        runner.seq_lens[:num_reqs] -= evicted.to(runner.seq_lens.device, runner.seq_lens.dtype)
        runner.optimistic_seq_lens_cpu[:num_reqs] -= evicted.to(runner.optimistic_seq_lens_cpu.dtype)
        batch.block_table.compute_slot_mapping(num_reqs, runner.query_start_loc.gpu[: num_reqs + 1],
                                               runner.positions[:total])

    def after_execute_model(self) -> None:
        """Advance every request of the step; compact the ones that overflowed their budget."""
        for req_id, q in self.step:
            slots = self.requests.get(req_id)
            if slots is None:
                continue
            started = time.perf_counter()
            if slots.reads_keys:
                stats = self._stat_reader(req_id, slots)
                plan = slots.advance(q, stats=stats, layers=self.layer_numbers)
                if plan is not None and stats.statistic.per_slot:
                    slots.held_stats = {layer: every[torch.from_numpy(plan.rows_for(layer))]
                                        for layer, every in stats.read.items()}
            else:
                plan = slots.advance(q)
            if plan is not None:
                self._compact(req_id, slots, plan)
                self.compaction_seconds += time.perf_counter() - started
        self.step = []
        metrics.record_held_slots(sum(held.slots for held in self.requests.values()))

    def forget(self, req_ids, rows: dict[str, list[int]] | None = None) -> None:
        """Requests finished; with ``reuse`` their states are kept under their block rows (``rows``)."""
        rows = rows or {}
        for req_id in req_ids or ():
            slots = self.requests.pop(req_id, None)
            if slots is None:
                continue
            if self.record:
                self.finished[req_id] = slots
            row = rows.get(req_id)
            if self.config.reuse and row and slots.seen:
                self.kept[row[0]] = slots
        if req_ids:
            metrics.record_held_slots(sum(held.slots for held in self.requests.values()))

    def take_new_rows(self, scheduler_output) -> None:
        """After vLLM updated its rows: a new request that starts past token 0 with a kept row's first block
        took over that cache (the scheduler's ``LadderManager.adopt``), so it continues the kept state; a
        kept state whose first block was handed to any other row was evicted by the scheduler."""
        if not self.kept:
            return
        handed: set[int] = set()
        for new in scheduler_output.scheduled_new_reqs:
            row = list(new.block_ids[0]) if new.block_ids else []
            if row and new.num_computed_tokens > 0 and new.req_id not in self.requests and row[0] in self.kept:
                slots = self.kept.pop(row[0])
                if slots.seen != new.num_computed_tokens:
                    raise RuntimeError(f"lacache: request {new.req_id} continues a kept cache of {slots.seen} "
                                       f"tokens at token {new.num_computed_tokens}")
                self.requests[new.req_id] = slots
                self.reused_requests += 1
                metrics.record_reuse(slots.seen)
                handed.update(row[1:])
                continue
            handed.update(row)
        for ids in scheduler_output.scheduled_cached_reqs.new_block_ids or ():
            if ids:
                handed.update(ids[0])
        for first in handed.intersection(self.kept):
            del self.kept[first]

    # ------------------------------------------------------------------ compaction
    def _stat_reader(self, req_id: str, slots: RequestSlots):
        """``stats(layer, n)`` for ``RequestSlots.advance``: every slot's key statistic ``[1, n]`` of one layer
        (``RetentionPolicy.key_statistic``), read from the paged keys, where each key sits at its slot's
        position. A statistic a slot keeps (``per_slot``, the key norm) is read only for the slots written
        since the last compaction (they never moved), the others kept from then; any other is read for
        every slot. Read for every layer at the first call (most steps never make one), averaged over the
        ranks' heads under tensor parallel, then rounded as every backend rounds it. What it read stays
        on ``stats.read`` (a kept statistic's survivors are kept)."""
        paged = self.paged()
        statistic = slots.policy.key_statistic
        if statistic is None:
            raise RuntimeError(f"lacache: {type(slots.policy).__name__} reads keys but names no key_statistic")

        def stats(layer: int, n: int) -> torch.Tensor:
            if not stats.new:
                rows = list(self.runner.requests[req_id].block_ids[0])
                held = slots.held_stats if statistic.per_slot else {}
                start = next(iter(held.values())).shape[0] if held else 0
                wanted = torch.arange(start, n, dtype=torch.int64)
                local = []
                for i in range(len(self.layer_numbers)):
                    keys, _ = paged.read(i, rows, wanted)  # [k, heads, dim]
                    local.append(statistic.head_values(keys.permute(1, 0, 2)[None])[0])
                means = torch.stack(local) if local else torch.zeros(0, n - start)
                if self.mean_over_ranks is not None:
                    means = self.mean_over_ranks(means)
                means = statistic.round(means).cpu()
                stats.new = {number: means[i] for i, number in enumerate(self.layer_numbers)}
            held = slots.held_stats.get(layer) if statistic.per_slot else None
            every = stats.new[layer] if held is None else torch.cat([held, stats.new[layer]])
            stats.read[layer] = every
            return every[None]

        stats.read, stats.new, stats.statistic = {}, {}, statistic
        return stats

    def measure_pages(self) -> PagedKV:
        """(Re)read the page layout of the KV caches the runner holds now (at engine start, and again should
        vLLM allocate them anew)."""
        self._paged = None
        return self.paged()

    def paged(self) -> PagedKV:
        if self._paged is None:
            runner = self.runner
            context = runner.compilation_config.static_forward_context
            names = sorted(context, key=_layer_number)
            # the model's own layer numbers: on a later pipeline stage the local layers 0, 1, ... are the
            # model's k, k+1, ..., and each must get its own row of a plan that covers every layer
            self.layer_numbers = [_layer_number(name) for name in names]
            layers = [context[name] for name in names]
            caches = [layer.kv_cache if not isinstance(layer.kv_cache, (list, tuple)) else layer.kv_cache[0]
                      for layer in layers]
            self._paged = PagedKV(layers, caches, runner.cache_config.block_size)
        return self._paged

    def _rotate(self, keys: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Turn keys ``[n, heads, head_dim]`` by ``delta`` positions with the model's own angle table.

        vLLM's table holds cos and sin of non-negative positions only; ``sin(-d) = -sin(d)`` gives
        the rest. The rotation itself is lacache's one rotate-half (``lacache.rope.rotate_half``).
        """
        half = self.rotary_dim // 2
        table = self.angles[delta.abs()]
        cos = table[:, None, :half]
        sin = table[:, None, half:] * torch.sign(delta).to(torch.float32)[:, None, None]
        return rotate_half(keys, cos, sin)

    def _compact(self, req_id: str, slots: RequestSlots, plan) -> None:
        paged = self.paged()
        state = self.runner.requests[req_id]
        block_ids = list(state.block_ids[0])
        start = plan.stable_prefix
        kept = plan.kept
        if start < kept:
            target = torch.arange(start, kept, dtype=torch.int64)
            for local, layer in enumerate(self.layer_numbers):
                rows = torch.from_numpy(plan.rows_for(layer)[start:kept]).to(torch.int64)
                keys, values = paged.read(local, block_ids, rows)
                keys = self._rotate(keys, target - rows)
                paged.write(local, block_ids, target, keys, values)
        self.compactions += 1
        self._truncate(req_id, state, kept)
        metrics.record_compaction(slots, (kept - start) * len(self.layer_numbers) if start < kept else 0)

    def _truncate(self, req_id: str, state, kept: int) -> None:
        """Drop the row's blocks past the held slots and the decode row (the scheduler frees the same)."""
        block_size = self.runner.cache_config.block_size
        ids = state.block_ids[0]
        # the scheduler keeps min(decode_slots, prompt + max_tokens) slots of row; the shorter bound only
        # matters for a request that never compacts, so decode_slots gives the same blocks here
        keep = kept_blocks(kept, len(ids), self.config.decode_slots, block_size)
        if len(ids) <= keep:
            return
        del ids[keep:]
        batch = self.runner.input_batch
        row = batch.req_id_to_index.get(req_id)
        if row is not None:
            table = batch.block_table[0]
            table.num_blocks_per_row[row] = keep


def _layer_number(name: str) -> int:
    """The model's layer number in an attention layer's name (``model.layers.17.self_attn.attn`` -> 17)."""
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    raise ValueError(f"lacache: attention layer {name!r} has no layer number in its name; the plugin needs it to "
                     "give each layer its own retention plan")

