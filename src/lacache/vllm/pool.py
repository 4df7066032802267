"""How big the KV pool of an engine with the plugin is: sized for its bounded rows, and checked before start.

vLLM's CPU backend reserves a share of the node's memory for the KV pool (``gpu_memory_utilization``,
0.92 by default), sized for requests of ``max_model_len`` tokens. A bounded request never holds more
than its *peak row* (``ServingConfig.peak_slots``): for a rule with compaction points (every served
rule but the authors' schedule) the decode row, ``budget + 1``, since the scheduler stops every pass
at a compaction point; for the authors' schedule, the slots it keeps (``capacity``) plus one
prefill chunk of ``max_num_batched_tokens`` tokens being computed. A decoding request holds
``capacity + 1``. So
unless the engine sets its own size (``kv_cache_memory_bytes`` / ``VLLM_CPU_KVCACHE_SPACE``,
``num_gpu_blocks_override``, or a ``gpu_memory_utilization`` other than vLLM's default), the plugin
gives the pool exactly what ``max_num_seqs`` decoding requests and one prefilling request take, at
most half of the memory available at start (then fewer requests run at once; admission by peak row
keeps every running one whole), and says so in one start-up line.

A pool smaller than one peak row can never run a request: it is refused at start in one line that
names the budget and the chunk, and says what to lower (the chunk, not ``max_model_len``, which a
bounded request does not fill). This module imports no vLLM: it reads the config's attributes.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import ServingConfig

__all__ = ["PoolPlan", "plan_pool", "pool_refusal", "bytes_per_block", "step_tokens", "GIB"]

GIB = 1 << 30

#: the share of the memory available at start a sized pool takes at most (the rest: weights, activations,
#: the server's own processes)
MAX_SHARE = 0.5

#: vLLM's default ``gpu_memory_utilization`` (``CacheConfig``): a value other than this one was set by the user
VLLM_DEFAULT_UTILIZATION = 0.92


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def step_tokens(vllm_config) -> int:
    """The most new tokens one request computes in a pass: one prefill chunk (``max_num_batched_tokens``,
    never more than ``max_model_len``)."""
    return int(min(vllm_config.scheduler_config.max_num_batched_tokens, vllm_config.model_config.max_model_len))


def bytes_per_block(vllm_config) -> int:
    """Bytes one block of the pool takes in one worker: keys and values of ``block_size`` slots, for every
    attention layer this worker holds (its share of the KV heads under tensor parallelism)."""
    model = vllm_config.model_config
    heads = int(model.get_num_kv_heads(vllm_config.parallel_config))
    layers = int(model.get_num_layers(vllm_config.parallel_config))
    size = _dtype_bytes(model.dtype)
    return 2 * int(vllm_config.cache_config.block_size) * heads * int(model.get_head_size()) * size * layers


def _dtype_bytes(dtype) -> int:
    itemsize = getattr(dtype, "itemsize", None)
    if isinstance(itemsize, int):
        return itemsize
    return {"float32": 4, "float16": 2, "bfloat16": 2}.get(str(dtype).replace("torch.", ""), 4)


@dataclass(frozen=True)
class PoolPlan:
    """A pool size and what it holds."""

    block_size: int
    bytes_per_block: int
    blocks: int  # usable blocks (vLLM keeps one more, its null block)
    decode_blocks: int  # one decoding request's row
    peak_blocks: int  # one request's row while a full prefill chunk is computed
    requests: int  # decoding requests that fit next to one prefilling request
    max_num_seqs: int
    step: int

    @property
    def nbytes(self) -> int:
        return (self.blocks + 1) * self.bytes_per_block

    def line(self) -> str:
        """The start-up line."""
        held = (f"{self.requests} decoding requests" if self.requests >= self.max_num_seqs
                else f"{self.requests} decoding requests at once (max_num_seqs is {self.max_num_seqs}: the rest wait; "
                     f"at most {MAX_SHARE:.0%} of the memory available at start)")
        chunk = (f" and one prefill chunk of {self.step} tokens ({self.peak_blocks} blocks at its peak)"
                 if self.peak_blocks > self.decode_blocks else
                 " (a prefill chunk needs no more: passes stop at every compaction point)")
        return (f"KV pool sized for the bounded rows: {self.nbytes / GIB:.2f} GiB = {self.blocks + 1} blocks of "
                f"{self.block_size} slots, for {held} of {self.decode_blocks} block(s){chunk}; set "
                f"--kv-cache-memory-bytes (or VLLM_CPU_KVCACHE_SPACE) to choose another size")


def user_sized(vllm_config, engine_args=None) -> bool:
    """Whether the engine sets the pool's size itself (then the plugin leaves it alone)."""
    cache = vllm_config.cache_config
    if getattr(cache, "kv_cache_memory_bytes", None) is not None:
        return True
    if getattr(cache, "num_gpu_blocks_override", None) is not None:
        return True
    utilization = getattr(engine_args, "gpu_memory_utilization", None) if engine_args is not None else None
    if utilization is None:
        utilization = getattr(cache, "gpu_memory_utilization", VLLM_DEFAULT_UTILIZATION)
    return abs(float(utilization) - VLLM_DEFAULT_UTILIZATION) > 1e-9


def plan_pool(config: ServingConfig, vllm_config, available_bytes: int) -> PoolPlan:
    """The pool for ``max_num_seqs`` decoding rows and one peak row, within ``MAX_SHARE`` of ``available_bytes``
    (never less than one peak row: a smaller pool could run nothing)."""
    block_size = int(vllm_config.cache_config.block_size)
    per_block = bytes_per_block(vllm_config)
    step = step_tokens(vllm_config)
    decode = _cdiv(config.decode_slots, block_size)
    peak = _cdiv(config.peak_slots(step), block_size)
    seqs = max(1, int(vllm_config.scheduler_config.max_num_seqs))
    limit = int(available_bytes * MAX_SHARE) // per_block - 1  # usable blocks within the share
    requests = seqs
    if peak + (seqs - 1) * decode > limit:
        requests = max(1, 1 + (limit - peak) // decode) if limit >= peak else 1
    blocks = peak + (requests - 1) * decode
    return PoolPlan(block_size, per_block, blocks, decode, peak, requests, seqs, step)


def pool_refusal(config: ServingConfig, vllm_config, pool_blocks: int) -> str | None:
    """One line when a pool of ``pool_blocks`` usable blocks cannot hold one request's peak row, or None."""
    block_size = int(vllm_config.cache_config.block_size)
    step = step_tokens(vllm_config)
    peak = _cdiv(config.peak_slots(step), block_size)
    if pool_blocks >= peak:
        return None
    if config.points.period is not None:  # passes stop at compaction points: no chunk ever adds to the row
        return (f"lacache: the KV pool holds {pool_blocks} usable block(s) of {block_size} slots, too few for one "
                f"request's row: budget {config.budget} + the token being computed = {config.decode_slots} slots = "
                f"{peak} blocks (passes stop at every compaction point, so the prefill chunk adds none); give the "
                f"pool at least {peak + 1} blocks (--num-gpu-blocks-override {peak + 1}, or more "
                f"--kv-cache-memory-bytes) or use a smaller --budget")
    room = pool_blocks * block_size - config.capacity
    if room >= 16:
        chunk = room // 16 * 16
        fit = f"e.g. --max-num-batched-tokens {chunk}"
        if chunk < int(vllm_config.scheduler_config.max_num_seqs):  # vLLM wants a chunk of at least max_num_seqs
            fit += f" --max-num-seqs {chunk}"
    else:
        fit = "with a smaller --budget"
    return (f"lacache: the KV pool holds {pool_blocks} usable block(s) of {block_size} slots, too few for one "
            f"request's peak row: budget {config.budget} (up to {config.capacity} slots held) + one prefill chunk "
            f"of {step} tokens (--max-num-batched-tokens) = {config.capacity + step} slots = {peak} blocks; lower "
            f"the chunk ({fit}) or give the pool at least {peak + 1} blocks (--num-gpu-blocks-override "
            f"{peak + 1}, or more --kv-cache-memory-bytes); max_model_len does not matter to a bounded request")
