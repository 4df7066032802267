"""lacache's own generation loop: chunked prefill, then one token at a time, forever if asked.

Unlike ``model.generate()``, which gives each token its absolute position, this loop positions
the new tokens right after the cache's slots. With a bounded cache every position the model ever
sees is below ``budget + chunk``, so token ten million is computed as precisely as token one
(absolute positions lose float32 precision past ~1e5) and generation can run far past the
model's trained context.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from numbers import Real

import torch
from transformers.cache_utils import Cache

from ..checks import is_integer
from . import BoundedCache
from .compat import cache_argument
from .memory import current_rss_bytes, peak_rss_bytes

__all__ = ["StreamStats", "check_sampling", "stream_tokens", "stream_generate", "cache_slots", "cache_bytes",
           "next_positions"]


@dataclass
class StreamStats:
    """What a stream cost; filled in as tokens are produced."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    cache_slots: int = 0
    cache_bytes: int = 0
    peak_rss_bytes: int = 0
    #: (tokens generated so far, cache bytes, process RSS bytes), sampled every ``sample_every`` tokens
    samples: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def decode_tokens_per_second(self) -> float:
        return self.new_tokens / self.decode_seconds if self.decode_seconds else float("nan")


def next_positions(cache: Cache, q: int, device) -> torch.Tensor:
    """Positions for ``q`` new tokens: right after the slots of a bounded cache, absolute otherwise."""
    start = cache.num_slots if isinstance(cache, BoundedCache) else cache.get_seq_length()
    return torch.arange(start, start + q, device=device)[None]


def cache_bytes(cache: Cache) -> int:
    """Bytes the cache holds for keys and values (a bounded cache's whole buffers; a full cache's tensors)."""
    if isinstance(cache, BoundedCache):
        return cache.memory_bytes()
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


class IncrementalText:
    """Turns a stream of token ids into printable text pieces.

    Decodes a growing window so multi-byte characters and merges print correctly, holding back a
    piece that ends in a partial character; the window restarts every 64 tokens to stay cheap.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.pending: list[int] = []
        self.printed = ""

    def feed(self, token_id: int) -> str:
        self.pending.append(token_id)
        text = self.tokenizer.decode(self.pending, skip_special_tokens=self.skip_special_tokens)
        if text.endswith("\ufffd"):
            return ""
        piece = text[len(self.printed) :]
        self.printed = text
        if len(self.pending) > 64:
            self.pending, self.printed = [], ""
        return piece


def cache_slots(cache: Cache) -> int:
    """Slots per layer a cache holds now (a full cache holds every token seen)."""
    if isinstance(cache, BoundedCache):
        return cache.num_slots
    return int(cache.get_seq_length())


def check_sampling(temperature: float, top_p: float) -> None:
    """Refuse sampling settings that would fail deep in ``torch.multinomial`` (NaN probabilities) or
    silently mean something else (a negative ``top_p`` keeping only the top token); one ``ValueError``
    naming the parameter and a value that works."""
    if not isinstance(temperature, Real) or isinstance(temperature, bool) or not (
        math.isfinite(temperature) and temperature >= 0
    ):
        raise ValueError(f"temperature={temperature!r} must be a finite number >= 0 (0 = greedy), e.g. temperature=0.7")
    if not isinstance(top_p, Real) or isinstance(top_p, bool) or not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p!r} must be a number in (0, 1] (1 = no nucleus cut), e.g. top_p=0.9")


def _check_stream_settings(max_new_tokens, seed, sample_every) -> None:
    """The counts and seed of ``stream_tokens``: a negative count would silently yield nothing."""
    if max_new_tokens is not None and (
        not is_integer(max_new_tokens) or max_new_tokens < 0
    ):
        raise ValueError(
            f"max_new_tokens={max_new_tokens!r} must be an integer >= 0, or None to never stop; e.g. max_new_tokens=256"
        )
    if seed is not None and (not is_integer(seed) or not -(2**63) <= seed < 2**64):
        raise ValueError(f"seed={seed!r} must be an integer (torch takes -2**63 to 2**64 - 1), e.g. seed=0")
    if not is_integer(sample_every) or sample_every < 1:
        raise ValueError(f"sample_every={sample_every!r} must be a positive integer, e.g. sample_every=250")


def _choose(logits: torch.Tensor, temperature: float, top_p: float, generator) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def prefill_passes(cache: Cache, tokens: int, most: int) -> Iterator[tuple[int, int]]:
    """(start, length) of each pass that feeds ``tokens`` more tokens to ``cache`` in passes of at most ``most``:
    a bounded cache's passes also end at its compaction points, so how the stream is chunked never changes
    what the cache keeps. Every consumer that chunks a stream (generation, chat, evaluations, benchmarks)
    splits it here."""
    lengths = (cache.split_passes(tokens, most) if isinstance(cache, BoundedCache)
               else [min(most, tokens - start) for start in range(0, tokens, most)])
    start = 0
    for length in lengths:
        yield start, length
        start += length


@torch.no_grad()
def stream_tokens(
    model,
    input_ids: torch.Tensor,
    cache: Cache,
    max_new_tokens: int | None = None,
    *,
    prefill_chunk: int | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_token_id: int | list[int] | None = None,
    seed: int | None = None,
    stats: StreamStats | None = None,
    sample_every: int = 250,
) -> Iterator[int]:
    """Yield new token ids one by one (batch of one). ``max_new_tokens=None`` never stops by itself;
    ``0`` yields nothing (the prompt is still fed to the cache); a negative count is refused.

    ``temperature`` 0 is greedy; ``top_p`` in (0, 1] keeps the smallest set of tokens whose
    probabilities reach it. Bad settings raise ``ValueError`` at the first ``next()``.

    ``prefill_chunk`` feeds the prompt in passes of at most that many tokens; a bounded cache also
    ends a pass at each of its compaction points (``BoundedCache.split_passes``), so the stream keeps
    the same slots, and gives the same tokens, whatever ``prefill_chunk`` is, and a prompt of any
    length costs memory for ``budget + 1`` slots (``budget + prefill_chunk`` for the authors'
    schedule, which has no points); default: the cache's budget (or the whole prompt for an
    unbounded cache).
    """
    check_sampling(temperature, top_p)
    _check_stream_settings(max_new_tokens, seed, sample_every)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.shape[0] != 1:
        raise ValueError(f"stream_tokens streams one sequence; got a batch of {input_ids.shape[0]}")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids is empty: give at least one prompt token")
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    stats = stats if stats is not None else StreamStats()
    stats.prompt_tokens = int(input_ids.shape[1])
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or [])
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    if prefill_chunk is None:
        prefill_chunk = cache.budget if isinstance(cache, BoundedCache) else input_ids.shape[1]
    if prefill_chunk < 1:
        raise ValueError(f"prefill_chunk={prefill_chunk} must be >= 1")

    started = time.perf_counter()
    logits = None
    cache_kwarg = cache_argument(model, cache)  # resolved once, not per token
    for start, length in prefill_passes(cache, input_ids.shape[1], prefill_chunk):
        piece = input_ids[:, start : start + length]
        positions = next_positions(cache, piece.shape[1], device)
        out = model(input_ids=piece, position_ids=positions, **cache_kwarg)
        logits = out.logits[:, -1]
    stats.prefill_seconds = time.perf_counter() - started

    started = time.perf_counter()
    produced = 0
    while max_new_tokens is None or produced < max_new_tokens:
        token = _choose(logits, temperature, top_p, generator)
        produced += 1
        stats.new_tokens = produced
        stats.decode_seconds = time.perf_counter() - started
        token_id = int(token)
        yield token_id
        if token_id in eos or (max_new_tokens is not None and produced >= max_new_tokens):
            break
        positions = next_positions(cache, 1, device)
        out = model(input_ids=token.view(1, 1), position_ids=positions, **cache_kwarg)
        logits = out.logits[:, -1]
        if produced % sample_every == 0:
            stats.samples.append((produced, cache_bytes(cache), current_rss_bytes()))
    stats.decode_seconds = time.perf_counter() - started
    stats.cache_slots = cache_slots(cache)
    stats.cache_bytes = cache_bytes(cache)
    stats.peak_rss_bytes = peak_rss_bytes()


def stream_generate(
    model,
    input_ids: torch.Tensor,
    cache: Cache,
    max_new_tokens: int,
    on_token: Callable[[int], None] | None = None,
    **kwargs,
) -> tuple[list[int], StreamStats]:
    """Run ``stream_tokens`` to the end; return the new ids and the stats."""
    stats = StreamStats()
    ids = []
    for token_id in stream_tokens(model, input_ids, cache, max_new_tokens, stats=stats, **kwargs):
        ids.append(token_id)
        if on_token is not None:
            on_token(token_id)
    return ids, stats
