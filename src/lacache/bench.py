"""Performance benchmarks: decode speed, memory, constant-memory streams, cache updates, chunked prefill.

Every benchmark is a pure function returning rows (dicts of plain numbers and strings) that
``bench_cli`` prints as tables and writes as CSV/JSON, plus a ``plot_*`` function drawing a PNG:

* :func:`bench_decode` — decode ms/token in windows of generated tokens, with cache bytes and
  process RSS at each window end (the ``decode`` and ``memory`` benchmarks share one run);
* :func:`bench_stream` — a continuous stream at constant memory, sampled at intervals, with the
  verdict "memory after N tokens vs memory once the cache first filled";
* :func:`bench_cache_update` — time per token spent inside ``cache.update`` over all layers, on
  synthetic keys/values, against :class:`ReferenceLadderCache` (the reference implementation's
  per-step strategy, re-implemented here) and StreamingLLM;
* :func:`bench_prefill` — chunked prefill of a long prompt, against the computed size of a full cache.

Memory is read from the process (RSS, and its high-water mark reset per phase through
``/proc/self/clear_refs``), from the cache (``memory_bytes``) and from CUDA when on a GPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from torch import nn
from transformers.cache_utils import Cache

from .cache import BoundedCache, LaCache, StreamingLLMCache
from .generation import cache_bytes
from .ladder import default_span_overlap, ladder_geometry
from .memory import current_rss_bytes

__all__ = [
    "CACHE_METHODS",
    "DECODE_METHODS",
    "EVERY_STEP_METHODS",
    "CacheStandIn",
    "ReferenceLadderCache",
    "bench_cache_update",
    "bench_decode",
    "bench_prefill",
    "bench_stream",
    "cache_bytes",
    "cache_summary",
    "decode_summary",
    "kv_bytes",
    "model_geometry",
    "peak_rss_since_reset",
    "plot_cache",
    "plot_decode",
    "plot_memory",
    "plot_prefill",
    "plot_stream",
    "reset_peak_rss",
    "tiny_model",
]

DECODE_METHODS = ("full", "streaming", "lacache", "tova", "h2o")
#: cache-update microbenchmark methods: our caches, and the reference strategy re-implemented
CACHE_METHODS = ("lacache", "lacache-salient", "ladder-step", "streaming", "reference")
#: methods that compact at every step once full: each step costs the same, so few timed steps suffice
EVERY_STEP_METHODS = ("reference", "ladder-step")
MB = 2**20


# --------------------------------------------------------------------------- memory helpers
def kv_bytes(layers: int, kv_heads: int, head_dim: int, dtype_bytes: int, slots: int, batch: int = 1) -> int:
    """Bytes of keys and values for ``slots`` tokens: ``2 * layers * kv_heads * head_dim * dtype_bytes * slots * batch``."""
    return 2 * layers * kv_heads * head_dim * dtype_bytes * slots * batch


def model_geometry(model: nn.Module) -> dict:
    """Layers, KV heads, head size and trained context of a transformers causal LM (or a stand-in)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = int(config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return {
        "layers": int(config.num_hidden_layers),
        "kv_heads": int(getattr(config, "num_key_value_heads", None) or heads),
        "head_dim": int(head_dim),
        "trained_context": getattr(config, "max_position_embeddings", None),
    }


def _slots(cache: Cache) -> int:
    return cache.num_slots if isinstance(cache, BoundedCache) else int(cache.get_seq_length())


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark of this process (Linux); False where it cannot be."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_since_reset() -> int:
    """The process's RSS high-water mark (``VmHWM``) since the last :func:`reset_peak_rss`; 0 if unknown."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _cuda_allocated(device) -> int | None:
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return int(torch.cuda.memory_allocated(device))


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _fresh_phase(device) -> None:
    """Start new peak readings (caches hold no reference cycles: dropping one frees it at once)."""
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    reset_peak_rss()


# --------------------------------------------------------------------------- models
def tiny_model(layers: int = 4, hidden: int = 64, heads: int = 4, kv_heads: int = 2, vocab: int = 256,
               seed: int = 0, dtype: torch.dtype = torch.float32, context: int = 8192):
    """A random Llama, small enough to stream a million tokens on a CPU (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=context,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).eval().to(dtype)


class CacheStandIn(nn.Module):
    """Just enough of a model for ``LaCache.from_model``/``StreamingLLMCache.from_model``: a Llama
    ``config`` with the given shape and the model's rotary module (``rotary_emb``, holding ``inv_freq``)."""

    def __init__(self, layers: int, kv_heads: int = 8, head_dim: int = 128, context: int = 8192):
        super().__init__()
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        self.config = LlamaConfig(
            num_hidden_layers=layers, num_attention_heads=kv_heads, num_key_value_heads=kv_heads,
            head_dim=head_dim, hidden_size=kv_heads * head_dim, intermediate_size=4, vocab_size=8,
            max_position_embeddings=context,
        )
        self.rotary_emb = LlamaRotaryEmbedding(self.config)


# --------------------------------------------------------------------------- reference strategy
class ReferenceLadderCache:
    """The per-step strategy of the LaCache authors' public implementation, re-implemented for timing.

    That implementation keeps a list of per-layer key/value tensors (a ``DynamicCache``) and, per
    generated token:

    1. appends the new key/value to each layer by concatenation (a fresh allocation every step);
    2. stores keys *un-rotated* and, in each attention layer, rotates every cached key to its slot
       position ``0..n-1`` (a precomputed cos/sin table, ``k * cos + rotate_half(k) * sin``) before
       attention — the whole cache is rotated at every step;
    3. after the forward, whenever a layer holds more than the budget, builds each layer's keep-index
       list in Python — sinks and history before the cursor, then, rung by rung of ``B`` slots, the
       ``A`` slots starting at offset ``i % (B - A + 1)`` for layer ``i``, then everything after the
       compacted rungs up to the recent tokens — turns it into an index tensor and gathers keys and
       values of every layer into new tensors.

    The ladder schedule (cursor, wrap-around to the sinks when a rung would reach the recent window,
    ``B``/``A`` from :func:`lacache.ladder.ladder_geometry`) is the same as LaCache's with no salient
    pool and no chunking, so both keep the same tokens (``tests/test_bench.py`` checks it); only the
    mechanics differ. ``track_tokens`` records which original token each slot holds (off for timing).
    """

    def __init__(self, rotary_emb: nn.Module, num_layers: int, budget: int, span: int | None = None,
                 overlap: int | None = None, sinks: int = 4, window: int | None = None, track_tokens: bool = False):
        if span is None or overlap is None:
            span, overlap = default_span_overlap(num_layers)
        self.geometry = ladder_geometry(num_layers, span, overlap)
        self.rotary_emb = rotary_emb
        self.num_layers = num_layers
        self.budget = int(budget)
        self.sinks = int(sinks)
        self.window = max(self.geometry.rung, budget // 4) if window is None else int(window)
        if self.budget - self.sinks - self.window < self.geometry.rung - 1:
            raise ValueError(f"budget={budget} leaves no room for a rung between {sinks} sinks and a window of "
                             f"{self.window}")
        self.cursor = self.sinks
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.tokens: list[torch.Tensor] | None = [torch.empty(0, dtype=torch.long)] * num_layers if track_tokens else None
        self.seen = 0
        self._cos: torch.Tensor | None = None
        self._sin: torch.Tensor | None = None

    def _table(self, n: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cos is None or self._cos.shape[-2] < n or self._cos.device != like.device:
            size = max(n, 2 * self.budget + 64)
            positions = torch.arange(size, device=like.device)[None]
            cos, sin = self.rotary_emb(like, positions)  # [1, size, D]
            self._cos, self._sin = cos[:, None], sin[:, None]  # [1, 1, size, D]
        return self._cos[:, :, :n], self._sin[:, :, :n]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int):
        """Append this step's states to a layer; return (all keys rotated to slots 0..n-1, all values)."""
        from transformers.models.llama.modeling_llama import rotate_half

        if layer_idx == 0:
            self.seen += key_states.shape[-2]
        old_k, old_v = self.keys[layer_idx], self.values[layer_idx]
        if old_k is None:
            k, v = key_states, value_states
        else:
            k = torch.cat([old_k, key_states], dim=-2)
            v = torch.cat([old_v, value_states], dim=-2)
        self.keys[layer_idx], self.values[layer_idx] = k, v
        if self.tokens is not None:
            q = key_states.shape[-2]
            new = torch.arange(self.seen - q, self.seen, dtype=torch.long)
            self.tokens[layer_idx] = torch.cat([self.tokens[layer_idx], new])
        cos, sin = self._table(k.shape[-2], k)
        rotated = k * cos + rotate_half(k) * sin
        return rotated, v

    def keep_lists(self, n: int) -> list[list[int]]:
        """Each layer's kept slots (Python lists) to bring ``n`` slots back within the budget; advances the cursor."""
        big_b, small_a = self.geometry.rung, self.geometry.keep
        period = big_b - small_a + 1
        lists = [list(range(n)) for _ in range(self.num_layers)]
        m, c = n, self.cursor
        while m > self.budget:
            if c < self.sinks or c + big_b > m - self.window:
                c = self.sinks  # start over: compact the oldest history again
            rungs = min((m - self.window - c) // big_b, -(-(m - self.budget) // (big_b - small_a)))
            for i in range(self.num_layers):
                keep = (
                    list(range(c))
                    + [c + big_b * j + i % period + k for j in range(rungs) for k in range(small_a)]
                    + list(range(c + big_b * rungs, m))
                )
                previous = lists[i]
                lists[i] = [previous[x] for x in keep]
            m -= rungs * (big_b - small_a)
            c += rungs * small_a
        self.cursor = c
        return lists

    def end_step(self) -> None:
        """After the forward: compact every layer when over budget (Python index lists, gather, new tensors)."""
        n = self.keys[0].shape[-2]
        if n <= self.budget:
            return
        for i, keep in enumerate(self.keep_lists(n)):
            k, v = self.keys[i], self.values[i]
            index = torch.tensor(keep, dtype=torch.long, device=k.device)
            gather_k = index.view(1, 1, -1, 1).expand(k.shape[0], k.shape[1], -1, k.shape[3])
            gather_v = index.view(1, 1, -1, 1).expand(v.shape[0], v.shape[1], -1, v.shape[3])
            self.keys[i] = torch.gather(k, 2, gather_k)
            self.values[i] = torch.gather(v, 2, gather_v)
            if self.tokens is not None:
                self.tokens[i] = self.tokens[i][index.cpu()]

    @property
    def num_slots(self) -> int:
        return 0 if self.keys[0] is None else int(self.keys[0].shape[-2])

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values) if t is not None)


# --------------------------------------------------------------------------- (a)+(b) decode and memory
def _make_cache(method: str, model, budget: int, options: dict | None):
    from .registry import make_cache

    return make_cache(method, model, None if method == "full" else budget, **(options or {}))


def _close(cache) -> None:
    close = getattr(cache, "close", None)
    if callable(close):
        close()


def bench_decode(
    model,
    prompt_ids: torch.Tensor,
    methods: Sequence[str] = DECODE_METHODS,
    budget: int = 512,
    tokens: int = 8192,
    window: int = 256,
    temperature: float = 0.0,
    seed: int = 0,
    method_options: dict[str, dict] | None = None,
    on_row: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Decode ``tokens`` tokens per method with lacache's own loop; one row per window of ``window`` decode steps.

    Bounded methods use ``stream_tokens`` with their cache; ``full`` a ``DynamicCache`` through the
    same loop. A row holds the mean ms/token over its window (the forwards that produced tokens
    ``first..last``), and at the window's end the cache bytes and slots, the process RSS, its
    high-water mark since this method started, and CUDA memory when on a GPU.
    """
    from .generation import StreamStats, stream_tokens

    if tokens < 2:
        raise ValueError(f"tokens={tokens} must be >= 2 (the first token comes from the prefill)")
    if window < 1:
        raise ValueError(f"window={window} must be >= 1")
    device = _device_of(model)
    rows: list[dict] = []
    for method in methods:
        cache = _make_cache(method, model, budget, (method_options or {}).get(method))
        _fresh_phase(device)
        stats = StreamStats()
        stream = stream_tokens(model, prompt_ids, cache, tokens, temperature=temperature, seed=seed,
                               stats=stats, sample_every=1 << 62)
        next(stream)  # prefill and the first token: not a decode step
        _sync(device)
        start, first, produced = time.perf_counter(), 2, 1
        for _ in stream:
            produced += 1
            if (produced - 1) % window and produced < tokens:
                continue
            _sync(device)
            now = time.perf_counter()
            steps = produced - first + 1
            row = {
                "method": method,
                "budget": None if method == "full" else budget,
                "first": first,
                "last": produced,
                "context": int(prompt_ids.shape[-1]) + produced - 1,
                "ms_per_token": 1000.0 * (now - start) / steps,
                "tokens_per_s": steps / (now - start),
                "cache_slots": _slots(cache),
                "cache_bytes": cache_bytes(cache),
                "rss_bytes": current_rss_bytes(),
                "peak_rss_bytes": peak_rss_since_reset(),
                "cuda_allocated_bytes": _cuda_allocated(device),
            }
            rows.append(row)
            if on_row is not None:
                on_row(row)
            start, first = time.perf_counter(), produced + 1
        _close(cache)
        del cache, stream
    _fresh_phase(device)
    return rows


def decode_summary(rows: Sequence[dict]) -> list[dict]:
    """One row per method: ms/token in the first and last window and overall, final cache and peak RSS."""
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        steps = sum(r["last"] - r["first"] + 1 for r in mine)
        seconds = sum((r["last"] - r["first"] + 1) * r["ms_per_token"] / 1000 for r in mine)
        out.append({
            "method": method,
            "budget": mine[0]["budget"],
            "tokens": mine[-1]["last"],
            "ms_per_token_first": mine[0]["ms_per_token"],
            "ms_per_token_last": mine[-1]["ms_per_token"],
            "ms_per_token_mean": 1000 * seconds / steps,
            "tokens_per_s": steps / seconds,
            "cache_mb_last": mine[-1]["cache_bytes"] / MB,
            "rss_mb_last": mine[-1]["rss_bytes"] / MB,
            "peak_rss_mb": max(r["peak_rss_bytes"] for r in mine) / MB,
        })
    return out


# --------------------------------------------------------------------------- (c) constant-memory stream
def _stream_sample(cache, produced: int, elapsed: float, interval_tokens: int, interval_s: float, device) -> dict:
    return {
        "tokens": produced,
        "seconds": elapsed,
        "tokens_per_s": interval_tokens / interval_s if interval_s > 0 else float("nan"),
        "cache_bytes": cache_bytes(cache),
        "cuda_allocated_bytes": _cuda_allocated(device),
        "rss_bytes": current_rss_bytes(),
        "num_slots": _slots(cache),
        "seen": int(cache.get_seq_length()),
    }


_MEMORY_KEYS = ("cache_bytes", "rss_bytes", "cuda_allocated_bytes")


class _StreamMonitor:
    """Samples a stream every ``interval`` tokens and judges whether its memory stayed flat.

    Two early readings are kept. ``filled`` is taken at the first token that overflows the cache
    (its first compaction is planned but not yet applied). ``reference`` is taken one token later,
    once that compaction has been applied: the first compaction is where a bounded cache does its
    one-off set-up work (the allocator's first large temporaries for moving and re-rotating slots,
    the plans of its compaction cycle), so the steady state starts there. The verdict compares the
    final reading with ``reference``; ratios against ``filled`` are reported beside it.
    """

    def __init__(self, cache, device, interval: int, tokens: int, tolerance: float,
                 on_sample: Callable[[dict], None] | None):
        self.cache, self.device = cache, device
        self.interval, self.tokens, self.tolerance = interval, tokens, tolerance
        self.on_sample = on_sample
        self.samples: list[dict] = []
        self.filled: dict | None = None
        self.reference: dict | None = None
        self.began = self.last_time = time.perf_counter()
        self.last_tokens = 0

    def _reading(self, produced: int) -> dict:
        now = time.perf_counter()
        return _stream_sample(self.cache, produced, now - self.began, produced, now - self.began, self.device)

    def step(self, produced: int) -> None:
        if self.filled is not None and self.reference is None:
            self.reference = self._reading(produced)
        if self.filled is None and self.cache.seen > self.cache.num_slots:
            self.filled = self._reading(produced)
        if produced % self.interval and produced < self.tokens:
            return
        _sync(self.device)
        now = time.perf_counter()
        sample = _stream_sample(self.cache, produced, now - self.began, produced - self.last_tokens,
                                now - self.last_time, self.device)
        self.samples.append(sample)
        if self.on_sample is not None:
            self.on_sample(sample)
        self.last_time, self.last_tokens = now, produced

    def verdict(self) -> dict:
        final = self.samples[-1]
        verdict: dict = {"tolerance": self.tolerance, "final_tokens": final["tokens"],
                         "reference_tokens": self.reference and self.reference["tokens"],
                         "filled_tokens": self.filled and self.filled["tokens"]}
        ok = self.reference is not None
        for key in _MEMORY_KEYS:
            if self.reference is not None and self.reference[key]:
                ratio = final[key] / self.reference[key]
                verdict[f"{key}_ratio"] = ratio
                ok = ok and abs(ratio - 1) <= self.tolerance
            if self.filled is not None and self.filled[key]:
                verdict[f"{key}_ratio_vs_filled"] = final[key] / self.filled[key]
        verdict["flat"] = bool(ok)
        return verdict

    def result(self) -> dict:
        return {"reference": self.reference, "filled": self.filled, "final": self.samples[-1],
                "verdict": self.verdict(), "samples": self.samples,
                "tokens_per_s": self.samples[-1]["tokens"] / (self.samples[-1]["seconds"] or float("nan"))}


def bench_stream(
    model,
    prompt_ids: torch.Tensor,
    tokens: int,
    budget: int = 512,
    interval: int | None = None,
    method: str = "lacache",
    method_options: dict | None = None,
    temperature: float = 0.0,
    seed: int = 0,
    tolerance: float = 0.01,
    on_sample: Callable[[dict], None] | None = None,
) -> dict:
    """Generate ``tokens`` tokens with a bounded cache and check that memory stays flat.

    Samples every ``interval`` tokens (default ``tokens // 50``, at least 100): tokens/s over the
    interval, ``cache.memory_bytes()``, CUDA allocated memory (on a GPU), process RSS and the cache's
    slots; the verdict compares the last sample with the reading once the cache's first compaction
    was applied (see ``_StreamMonitor``): each ratio must be within ``tolerance``. Nothing per
    token is kept.
    """
    from .generation import StreamStats, stream_tokens

    if method == "full":
        raise ValueError("the stream benchmark needs a bounded cache; e.g. method='lacache'")
    if tokens < 2:
        raise ValueError(f"tokens={tokens} must be >= 2")
    interval = max(100, tokens // 50) if interval is None else int(interval)
    if interval < 1:
        raise ValueError(f"interval={interval} must be >= 1")
    device = _device_of(model)
    cache = _make_cache(method, model, budget, method_options)
    _fresh_phase(device)
    stream = stream_tokens(model, prompt_ids, cache, tokens, temperature=temperature, seed=seed,
                           stats=StreamStats(), sample_every=1 << 62)
    monitor = _StreamMonitor(cache, device, interval, tokens, tolerance, on_sample)
    produced = 0
    for _ in stream:
        produced += 1
        monitor.step(produced)
    geometry = model_geometry(model)
    result = {
        "method": method,
        "budget": budget,
        "tokens": produced,
        "interval": interval,
        "cache": cache.describe() if hasattr(cache, "describe") else {"cache": type(cache).__name__},
        "expected_cache_bytes": kv_bytes(geometry["layers"], geometry["kv_heads"], geometry["head_dim"],
                                         _dtype_bytes(model), budget + _headroom(cache)),
        **monitor.result(),
    }
    _close(cache)
    return result


def bench_cache_stream(
    tokens: int = 1_000_000,
    budget: int = 512,
    layers: int = 30,
    kv_heads: int = 3,
    head_dim: int = 64,
    method: str = "lacache",
    interval: int | None = None,
    tolerance: float = 0.01,
    seed: int = 0,
    on_sample: Callable[[dict], None] | None = None,
) -> dict:
    """``bench_stream`` without a model: ``tokens`` one-token updates of every layer with random K/V.

    A million decode steps of even a tiny model take about an hour on a 2-core CPU (the model's own
    per-call overhead), while the cache's memory behaviour only depends on the updates it receives;
    this drives the cache the way decoding does (absolute positions, one token per step) at the
    cache's own speed. Same samples and verdict as ``bench_stream``.
    """
    if tokens < 2:
        raise ValueError(f"tokens={tokens} must be >= 2")
    if method == "reference":
        raise ValueError("the stream benchmark needs a lacache cache; e.g. method='lacache'")
    interval = max(100, tokens // 50) if interval is None else int(interval)
    stand_in = CacheStandIn(layers, kv_heads=kv_heads, head_dim=head_dim)
    cache = _build_cache(method, stand_in, budget)
    gen = torch.Generator().manual_seed(seed)
    pool = 16
    new_k = torch.randn(pool, 1, kv_heads, 1, head_dim, generator=gen)
    new_v = torch.randn(pool, 1, kv_heads, 1, head_dim, generator=gen)
    monitor = _StreamMonitor(cache, torch.device("cpu"), interval, tokens, tolerance, on_sample)
    for produced in range(1, tokens + 1):
        pos = torch.tensor([[produced - 1]])
        k, v = new_k[produced % pool], new_v[produced % pool]
        for layer in range(layers):
            cache.update(k, v, layer, position_ids=pos)
        monitor.step(produced)
    return {
        "method": method, "budget": budget, "tokens": tokens, "interval": interval, "driver": "cache-only",
        "shape": {"layers": layers, "kv_heads": kv_heads, "head_dim": head_dim},
        "cache": cache.describe(),
        "expected_cache_bytes": kv_bytes(layers, kv_heads, head_dim, 4, budget + _headroom(cache)),
        **monitor.result(),
    }


def _dtype_bytes(model) -> int:
    return next(model.parameters()).element_size()


def _headroom(cache) -> int:
    layers = getattr(cache, "layers", None)
    return int(getattr(layers[0], "headroom", 0)) if layers else 0


# --------------------------------------------------------------------------- (d) cache-update microbenchmark
def _build_cache(method: str, stand_in: CacheStandIn, budget: int, track_tokens: bool = False):
    layers = stand_in.config.num_hidden_layers
    if method == "lacache":
        return LaCache.from_model(stand_in, budget=budget)
    if method == "lacache-salient":
        return LaCache.from_model(stand_in, budget=budget, salient=0.125)
    if method == "ladder-step":  # the reference's schedule exactly: no salient pool, compaction every step
        return LaCache.from_model(stand_in, budget=budget, salient=0, chunk=0)
    if method == "streaming":
        return StreamingLLMCache.from_model(stand_in, budget=budget)
    if method == "reference":
        return ReferenceLadderCache(stand_in.rotary_emb, layers, budget, track_tokens=track_tokens)
    raise ValueError(f"method={method!r} is not one of {CACHE_METHODS}")


def _time_updates(cache, method: str, layers: int, budget: int, steps: int, warmup: int, positions: str,
                  kv_heads: int, head_dim: int, dtype, device, seed: int) -> float:
    """Seconds per token of ``steps`` one-token updates of every layer, after filling the cache."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    pool = 8
    new_k = torch.randn(pool, 1, kv_heads, 1, head_dim, generator=gen).to(device=device, dtype=dtype)
    new_v = torch.randn(pool, 1, kv_heads, 1, head_dim, generator=gen).to(device=device, dtype=dtype)
    fill_k = torch.randn(1, kv_heads, budget, head_dim, generator=gen).to(device=device, dtype=dtype)
    fill_v = torch.randn(1, kv_heads, budget, head_dim, generator=gen).to(device=device, dtype=dtype)
    reference = method == "reference"
    if reference:
        for layer in range(layers):
            cache.update(fill_k, fill_v, layer)
        cache.end_step()
    else:
        pos = torch.arange(budget, device=device)[None]
        for layer in range(layers):
            cache.update(fill_k, fill_v, layer, position_ids=pos)
    seen = budget

    def step(i: int) -> None:
        nonlocal seen
        k, v = new_k[i % pool], new_v[i % pool]
        if reference:
            for layer in range(layers):
                cache.update(k, v, layer)
            cache.end_step()
        else:
            p = seen if positions == "absolute" else cache.num_slots
            pos = torch.tensor([[p]], device=device)
            for layer in range(layers):
                cache.update(k, v, layer, position_ids=pos)
        seen += 1

    for i in range(warmup):
        step(i)
    _sync(device)
    began = time.perf_counter()
    for i in range(steps):
        step(warmup + i)
    _sync(device)
    return (time.perf_counter() - began) / steps


def bench_cache_update(
    budgets: Sequence[int] = (256, 1024, 4096),
    layers: Sequence[int] = (30, 80),
    kv_heads: int = 8,
    head_dim: int = 128,
    methods: Sequence[str] = ("lacache", "reference", "streaming"),
    positions: Sequence[str] = ("absolute",),
    steps: int | None = None,
    ref_steps: int | None = 32,
    warmup: int = 32,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    on_row: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Time per token spent inside ``cache.update`` for every layer (update, compaction, rotation).

    Synthetic random keys/values (batch 1, one new token per step) after filling the cache to its
    budget and ``warmup`` more steps; timed over ``steps`` steps (default ``max(512, 2 * budget)``,
    covering many compactions: ours compact every ``budget // 16`` tokens). ``positions``: ``absolute``
    passes the absolute position of each new token as ``generate()`` does; ``slots`` the slot position
    (lacache's own loop). The reference strategy takes no positions (it always rotates to slots
    ``0..n-1``). Methods that compact at every step once full (``reference``, ``ladder-step``) cost the
    same at every step, so they are timed over ``ref_steps`` steps (default 32; ``None``: as ``steps``)
    after at most 4 warm-up steps. One row per (layers, budget, method, positions).
    """
    for method in methods:
        if method not in CACHE_METHODS:
            raise ValueError(f"method={method!r} is not one of {CACHE_METHODS}")
    for mode in positions:
        if mode not in ("absolute", "slots"):
            raise ValueError(f"positions={mode!r} must be 'absolute' or 'slots'")
    device = torch.device(device)
    rows = []
    for num_layers in layers:
        stand_in = CacheStandIn(num_layers, kv_heads, head_dim).to(device)
        for budget in budgets:
            n_steps = max(512, 2 * budget) if steps is None else int(steps)
            for method in methods:
                modes = ["slots 0..n-1"] if method == "reference" else list(positions)
                for mode in modes:
                    cache = _build_cache(method, stand_in, budget)
                    count, warm = n_steps, warmup
                    if method in EVERY_STEP_METHODS:
                        count = n_steps if ref_steps is None else min(n_steps, int(ref_steps))
                        warm = min(warmup, 4)
                    seconds = _time_updates(cache, method, num_layers, budget, count, warm, mode, kv_heads,
                                            head_dim, dtype, device, seed)
                    row = {
                        "layers": num_layers,
                        "budget": budget,
                        "method": method,
                        "positions": mode,
                        "steps": count,
                        "ms_per_token": 1000 * seconds,
                        "us_per_layer": 1e6 * seconds / num_layers,
                        "cache_slots": cache.num_slots,
                        "cache_bytes": cache.memory_bytes(),
                        "kv_heads": kv_heads,
                        "head_dim": head_dim,
                        "dtype": str(dtype).replace("torch.", ""),
                        "device": str(device),
                    }
                    rows.append(row)
                    if on_row is not None:
                        on_row(row)
                    del cache  # no reference cycles: freed here
    return rows


def cache_summary(rows: Sequence[dict]) -> list[dict]:
    """One row per (layers, budget, positions): ms/token per method and the reference / lacache ratio."""
    out = []
    keys = dict.fromkeys((r["layers"], r["budget"]) for r in rows)
    for num_layers, budget in keys:
        mine = [r for r in rows if r["layers"] == num_layers and r["budget"] == budget]
        ref = next((r["ms_per_token"] for r in mine if r["method"] == "reference"), None)
        modes = list(dict.fromkeys(r["positions"] for r in mine if r["method"] != "reference")) or ["slots 0..n-1"]
        for mode in modes:
            row = {"layers": num_layers, "budget": budget, "positions": mode}
            for method in dict.fromkeys(r["method"] for r in mine):
                hit = [r for r in mine if r["method"] == method and (method == "reference" or r["positions"] == mode)]
                row[f"{method}_ms"] = hit[0]["ms_per_token"] if hit else None
            ours = row.get("lacache_ms")
            row["reference_over_lacache"] = ref / ours if ref is not None and ours else None
            out.append(row)
    return out


# --------------------------------------------------------------------------- (e) chunked prefill
@torch.no_grad()
def bench_prefill(
    model,
    input_ids: torch.Tensor,
    budget: int = 512,
    prefill_chunk: int = 512,
    method: str = "lacache",
    method_options: dict | None = None,
    on_row: Callable[[dict], None] | None = None,
) -> dict:
    """Feed ``input_ids`` in chunks of ``prefill_chunk`` through a cache, as ``stream_tokens`` does.

    Each chunk is positioned after the cache's slots and only its last logit is computed. One row per
    chunk: tokens so far, tokens/s of the chunk and overall, process RSS, cache bytes, CUDA memory.
    The summary adds the run's peak RSS (high-water mark of this phase), CUDA peak, and the bytes a
    full cache would need for the whole prompt (``kv_bytes``, computed, never allocated).
    ``method='full'`` runs a ``DynamicCache`` the same way (only sensible within the trained context).
    """
    from .generation import next_positions

    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if prefill_chunk < 1:
        raise ValueError(f"prefill_chunk={prefill_chunk} must be >= 1")
    device = _device_of(model)
    input_ids = input_ids.to(device)
    total = int(input_ids.shape[1])
    cache = _make_cache(method, model, budget, method_options)
    _fresh_phase(device)
    rss_before = current_rss_bytes()
    rows = []
    began = time.perf_counter()
    for start in range(0, total, prefill_chunk):
        piece = input_ids[:, start : start + prefill_chunk]
        t0 = time.perf_counter()
        model(input_ids=piece, position_ids=next_positions(cache, piece.shape[1], device), cache=cache,
              logits_to_keep=1)
        _sync(device)
        now = time.perf_counter()
        done = start + piece.shape[1]
        row = {
            "tokens": done,
            "chunk_tokens_per_s": piece.shape[1] / (now - t0),
            "tokens_per_s": done / (now - began),
            "seconds": now - began,
            "rss_bytes": current_rss_bytes(),
            "cache_bytes": cache_bytes(cache),
            "cache_slots": _slots(cache),
            "cuda_allocated_bytes": _cuda_allocated(device),
        }
        rows.append(row)
        if on_row is not None:
            on_row(row)
    seconds = time.perf_counter() - began
    geometry = model_geometry(model)
    dtype_bytes = _dtype_bytes(model)
    cuda = torch.device(device).type == "cuda"
    summary = {
        "method": method,
        "budget": None if method == "full" else budget,
        "prefill_chunk": prefill_chunk,
        "tokens": total,
        "seconds": seconds,
        "tokens_per_s": total / seconds,
        "rss_before_bytes": rss_before,
        "peak_rss_bytes": peak_rss_since_reset(),
        "cuda_max_allocated_bytes": int(torch.cuda.max_memory_allocated(device)) if cuda else None,
        "cache_bytes": rows[-1]["cache_bytes"],
        "cache_slots": rows[-1]["cache_slots"],
        "full_cache_bytes": kv_bytes(geometry["layers"], geometry["kv_heads"], geometry["head_dim"], dtype_bytes,
                                     total),
        "trained_context": geometry["trained_context"],
        "beyond_trained_context": bool(geometry["trained_context"] and total > geometry["trained_context"]),
        **{k: geometry[k] for k in ("layers", "kv_heads", "head_dim")},
        "dtype_bytes": dtype_bytes,
    }
    _close(cache)
    del cache
    _fresh_phase(device)
    return {"summary": summary, "rows": rows}


# --------------------------------------------------------------------------- plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _by_method(rows: Sequence[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["method"], []).append(r)
    return out


def _save(fig, path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)


def plot_decode(rows: Sequence[dict], path, title: str = "Decode speed") -> None:
    """ms/token vs generated tokens, one line per method."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for method, mine in _by_method(rows).items():
        ax.plot([r["last"] for r in mine], [r["ms_per_token"] for r in mine], marker=".", label=method)
    ax.set_xlabel("generated tokens")
    ax.set_ylabel("ms / token (window mean)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    _save(fig, path)


def plot_memory(rows: Sequence[dict], path, title: str = "Memory while decoding") -> None:
    """Cache MB and process RSS MB vs generated tokens, one line per method."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method, mine in _by_method(rows).items():
        x = [r["last"] for r in mine]
        axes[0].plot(x, [r["cache_bytes"] / MB for r in mine], marker=".", label=method)
        line = axes[1].plot(x, [r["rss_bytes"] / MB for r in mine], marker=".", label=f"{method} RSS")
        axes[1].plot(x, [r["peak_rss_bytes"] / MB for r in mine], ls="--", color=line[0].get_color(), alpha=0.6,
                     label=f"{method} peak")
    axes[0].set_ylabel("KV cache (MB)")
    axes[1].set_ylabel("process RSS (MB)")
    for ax in axes:
        ax.set_xlabel("generated tokens")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylim(bottom=0)
    fig.suptitle(title)
    _save(fig, path)


def plot_stream(result: dict, path, title: str | None = None) -> None:
    """tokens/s, memory (cache, RSS, CUDA) and slots vs tokens of a constant-memory stream."""
    plt = _pyplot()
    samples = result["samples"]
    x = [s["tokens"] for s in samples]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    axes[0].plot(x, [s["tokens_per_s"] for s in samples], marker=".")
    axes[0].set_ylabel("tokens / s (interval)")
    axes[0].set_ylim(bottom=0)
    axes[1].plot(x, [s["cache_bytes"] / MB for s in samples], marker=".", label="cache.memory_bytes()")
    axes[1].plot(x, [s["rss_bytes"] / MB for s in samples], marker=".", label="process RSS")
    if samples[0]["cuda_allocated_bytes"] is not None:
        axes[1].plot(x, [s["cuda_allocated_bytes"] / MB for s in samples], marker=".", label="CUDA allocated")
    axes[1].set_ylabel("MB")
    axes[1].set_yscale("log")
    axes[1].legend(fontsize=8)
    axes[2].plot(x, [s["num_slots"] for s in samples], marker=".")
    axes[2].axhline(result["budget"], ls="--", color="gray", label=f"budget {result['budget']}")
    axes[2].set_ylabel("slots per layer")
    axes[2].set_ylim(bottom=0)
    axes[2].legend(fontsize=8)
    for ax in axes:
        ax.set_xlabel("generated tokens")
        ax.grid(alpha=0.3)
    verdict = result["verdict"]
    ratio = verdict.get("cache_bytes_ratio")
    rss = verdict.get("rss_bytes_ratio")
    fig.suptitle(title or (
        f"{result['method']} stream, budget {result['budget']}, {result['tokens']:,} tokens: memory "
        f"{'flat' if verdict['flat'] else 'NOT flat'} (cache x{ratio if ratio is None else round(ratio, 4)}, "
        f"RSS x{rss if rss is None else round(rss, 4)} vs after the first compaction)"
    ))
    _save(fig, path)


def plot_cache(rows: Sequence[dict], path, title: str = "Time inside cache.update per token (all layers)") -> None:
    """ms/token vs budget, one line per method (and positions mode) per layer count."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["positions"], r["layers"]), []).append(r)
    styles = ["-", "--", ":", "-."]
    layer_counts = sorted({r["layers"] for r in rows})
    colors = list(dict.fromkeys((method, mode) for method, mode, _ in groups))  # one colour per method/mode
    for (method, mode, num_layers), mine in groups.items():
        mine = sorted(mine, key=lambda r: r["budget"])
        label = f"{method} ({mode}), {num_layers} layers" if method != "reference" else f"reference, {num_layers} layers"
        ax.plot([r["budget"] for r in mine], [r["ms_per_token"] for r in mine], marker="o",
                color=f"C{colors.index((method, mode)) % 10}",
                ls=styles[layer_counts.index(num_layers) % len(styles)], label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("budget (slots per layer)")
    ax.set_ylabel("ms / token in cache.update (all layers)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    ax.set_title(title)
    _save(fig, path)


def plot_prefill(result: dict, path, title: str | None = None, full: dict | None = None) -> None:
    """Chunk tokens/s and memory vs prompt tokens, with the computed size of a full cache."""
    plt = _pyplot()
    s, rows = result["summary"], result["rows"]
    x = [r["tokens"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    axes[0].plot(x, [r["chunk_tokens_per_s"] for r in rows], marker=".", label=f"{s['method']} (per chunk)")
    if full is not None:
        axes[0].plot([r["tokens"] for r in full["rows"]], [r["chunk_tokens_per_s"] for r in full["rows"]],
                     marker=".", label="full (per chunk)")
    axes[0].set_ylabel("prefill tokens / s")
    axes[0].set_ylim(bottom=0)
    per_token = s["full_cache_bytes"] / s["tokens"]
    axes[1].plot(x, [r["cache_bytes"] / MB for r in rows], marker=".", label=f"{s['method']} cache")
    axes[1].plot(x, [r["rss_bytes"] / MB for r in rows], marker=".", label=f"process RSS ({s['method']})")
    axes[1].plot(x, [per_token * t / MB for t in x], ls="--", label="full cache KV (computed)")
    if full is not None:
        fx = [r["tokens"] for r in full["rows"]]
        axes[1].plot(fx, [r["cache_bytes"] / MB for r in full["rows"]], marker=".", label="full cache (measured)")
        axes[1].plot(fx, [r["rss_bytes"] / MB for r in full["rows"]], marker=".", label="process RSS (full)")
    axes[1].set_ylabel("MB")
    axes[1].set_yscale("log")
    for ax in axes:
        if s["trained_context"] and s["trained_context"] <= s["tokens"]:
            ax.axvline(s["trained_context"], color="gray", ls=":", label="trained context")
        ax.set_xlabel("prompt tokens")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title or f"Chunked prefill ({s['method']}, budget {s['budget']}, chunk {s['prefill_chunk']}), "
                          f"{s['tokens']:,} tokens")
    _save(fig, path)
