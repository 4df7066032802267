"""LaCache / StreamingLLMCache against DynamicCache and an independent reference forward."""

import pytest
import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

from conftest import tiny_llama
from lacache import LaCache, StreamingLLMCache
from lacache.cache.generation import stream_generate
from oracle_forward import ReferenceStream

CACHES = {
    "lacache": lambda m, budget, **kw: LaCache.from_model(m, budget=budget, sinks=2, **kw),
    "streaming": lambda m, budget, **kw: StreamingLLMCache.from_model(m, budget=budget, sinks=2, **kw),
}


def kept_sets(cache):
    return [cache.token_positions(layer).tolist() for layer in range(len(cache.layers))]


def run_against_reference(model, cache, ids, pieces, positions_mode, shift=True):
    """Feed ``ids`` in ``pieces``; compare each forward's logits with the reference. Returns max error."""
    ref = ReferenceStream(model, shift=shift)
    worst, start = 0.0, 0
    for size in pieces:
        piece = ids[start : start + size]
        if positions_mode == "slots":
            pos = torch.arange(cache.num_slots, cache.num_slots + size)
        else:
            pos = torch.arange(cache.seen, cache.seen + size)
        kept = kept_sets(cache)
        with torch.no_grad():
            out = model(input_ids=piece[None], position_ids=pos[None], cache=cache).logits[0]
        expected = ref.step(piece, pos, kept)
        worst = max(worst, (out - expected).abs().max().item())
        assert cache.num_slots <= cache.budget
        assert len({layer.num_slots for layer in cache.layers}) == 1
        start += size
    return worst


@pytest.mark.parametrize("kind", sorted(CACHES))
@pytest.mark.parametrize("positions_mode", ["slots", "absolute"])
def test_manual_loop_matches_reference_with_eviction(attn, kind, positions_mode):
    model = tiny_llama(attn)
    cache = CACHES[kind](model, 24)
    ids = torch.randint(0, 96, (130,), generator=torch.Generator().manual_seed(1))
    pieces = [40] + [1] * 50 + [7, 13] + [1] * 20  # long prefill (multi-pass), decode, chunks, decode
    err = run_against_reference(model, cache, ids, pieces, positions_mode)
    assert err <= 1e-4
    assert cache.seen == 130
    if kind == "lacache":
        sets = {tuple(s) for s in kept_sets(cache)}
        assert len(sets) > 1, "different layers should hold different tokens"


def test_original_positions_match_reference(attn):
    model = tiny_llama(attn)
    cache = LaCache.from_model(model, budget=24, sinks=2, positions="original")
    ids = torch.randint(0, 96, (70,), generator=torch.Generator().manual_seed(2))
    err = run_against_reference(model, cache, ids, [30] + [1] * 40, "absolute", shift=False)
    assert err <= 1e-4


def test_reference_detects_wrong_positions():
    """Negative control: the comparison is sensitive to key positions, so it can fail."""
    model = tiny_llama("eager")
    cache = LaCache.from_model(model, budget=24, sinks=2)  # shifted keys
    ids = torch.randint(0, 96, (60,), generator=torch.Generator().manual_seed(3))
    err = run_against_reference(model, cache, ids, [30] + [1] * 30, "absolute", shift=False)
    assert err > 1e-2


class _Snapshot(LogitsProcessor):
    """Records, after every forward inside generate(), which tokens each layer holds."""

    def __init__(self, cache):
        self.cache = cache
        self.kept = []

    def __call__(self, input_ids, scores):
        self.kept.append(kept_sets(self.cache))
        return scores


@pytest.mark.parametrize("kind", sorted(CACHES))
def test_generate_matches_reference_with_eviction(attn, kind):
    model = tiny_llama(attn)
    cache = CACHES[kind](model, 20)
    prompt = torch.randint(0, 96, (1, 30), generator=torch.Generator().manual_seed(4))
    snap = _Snapshot(cache)
    with torch.no_grad():
        out = model.generate(
            prompt,
            cache=cache,
            max_new_tokens=40,
            do_sample=False,
            logits_processor=LogitsProcessorList([snap]),
            output_scores=True,
            return_dict_in_generate=True,
        )
    seq = out.sequences[0]
    ref = ReferenceStream(model, shift=True)
    kept_before = [[] for _ in range(len(cache.layers))]
    steps = [(0, 30)] + [(30 + i, 1) for i in range(39)]
    worst = 0.0
    for (start, size), scores, kept_after in zip(steps, out.scores, snap.kept):
        piece = seq[start : start + size]
        logits = ref.step(piece, torch.arange(start, start + size), kept_before)[-1]
        worst = max(worst, (logits - scores[0]).abs().max().item())
        kept_before = kept_after
    assert worst <= 1e-4
    assert cache.num_slots <= 20


@pytest.mark.parametrize("kind", sorted(CACHES))
def test_budget_above_length_equals_dynamic_cache(attn, kind):
    model = tiny_llama(attn)
    prompt = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(5))
    kwargs = dict(max_new_tokens=30, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        full = model.generate(prompt, cache=DynamicCache(config=model.config), **kwargs)
        bounded = model.generate(prompt, cache=CACHES[kind](model, 64), **kwargs)
    assert torch.equal(full.sequences, bounded.sequences)
    worst = max((a - b).abs().max().item() for a, b in zip(full.scores, bounded.scores))
    assert worst <= 1e-5


def test_generate_with_chunked_prefill_matches_own_loop():
    model = tiny_llama("eager")
    prompt = torch.randint(0, 96, (1, 50), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        cache = LaCache.from_model(model, budget=24, sinks=2)
        out = model.generate(
            prompt, cache=cache, max_new_tokens=15, do_sample=False, prefill_chunk_size=10,
            output_scores=True, return_dict_in_generate=True,
        )
    assert cache.num_slots <= 24
    # same chunking, same absolute positions, by hand
    manual = LaCache.from_model(model, budget=24, sinks=2)
    seq = out.sequences[0]
    with torch.no_grad():
        for start in range(0, 50, 10):
            logits = model(
                input_ids=seq[None, start : start + 10], position_ids=torch.arange(start, start + 10)[None],
                cache=manual,
            ).logits
    assert (logits[0, -1] - out.scores[0][0]).abs().max() <= 1e-5


def test_stream_generate_keeps_positions_bounded():
    model = tiny_llama("sdpa")
    seen_positions = []
    handle = model.model.rotary_emb.register_forward_pre_hook(
        lambda mod, args, kwargs: seen_positions.append(int(kwargs["position_ids"].max())), with_kwargs=True
    )
    cache = LaCache.from_model(model, budget=32, sinks=2)
    ids, stats = stream_generate(model, torch.randint(0, 96, (1, 100)), cache, max_new_tokens=300, prefill_chunk=16)
    handle.remove()
    assert len(ids) == 300 and stats.new_tokens == 300
    assert max(seen_positions) < 32 + 16
    assert cache.seen == 100 + 299
    assert cache.num_slots <= 32


def test_stream_generate_with_slot_positions_matches_reference():
    model = tiny_llama("eager")
    cache = LaCache.from_model(model, budget=20, sinks=2)
    prompt = torch.randint(0, 96, (1, 25), generator=torch.Generator().manual_seed(7))
    ids, _ = stream_generate(model, prompt, cache, max_new_tokens=30, prefill_chunk=25)
    # replay the produced stream through a fresh cache + the reference with slot positions
    full = torch.cat([prompt[0], torch.tensor(ids[:-1])])
    replay = LaCache.from_model(model, budget=20, sinks=2)
    err = run_against_reference(model, replay, full, [25] + [1] * 29, "slots")
    assert err <= 1e-4


def test_token_positions_and_introspection():
    model = tiny_llama("sdpa")
    cache = LaCache.from_model(model, budget=24, sinks=2)
    assert cache.budget == 24 and len(cache.layers) == 4
    with torch.no_grad():
        model(input_ids=torch.randint(0, 96, (1, 10)), cache=cache)
    pos = cache.token_positions(1)
    assert pos.dtype == torch.long and pos.tolist() == list(range(10))
    with torch.no_grad():
        model(input_ids=torch.randint(0, 96, (1, 40)), cache=cache)
    for layer in range(4):
        pos = cache.token_positions(layer)
        assert len(pos) == cache.num_slots <= 24
        assert pos[:2].tolist() == [0, 1] and pos[-1].item() == 49
        assert (pos.diff() > 0).all()
    # buffers of budget + headroom slots: 2 x layers x kv_heads x head_dim x fp32 bytes x slots
    assert cache.memory_bytes() == 2 * 4 * 2 * 16 * 4 * (24 + 64)
    with pytest.raises(IndexError):
        cache.token_positions(0, batch_index=3)
    cache.reset()
    assert cache.seen == 0 and cache.num_slots == 0


def test_bf16_error_does_not_grow_over_2000_steps():
    torch.manual_seed(0)
    fp32 = tiny_llama("sdpa")
    bf16 = tiny_llama("sdpa", dtype=torch.bfloat16)
    c32 = LaCache.from_model(fp32, budget=64, sinks=2)
    c16 = LaCache.from_model(bf16, budget=64, sinks=2)
    ids = torch.randint(0, 96, (2000,), generator=torch.Generator().manual_seed(8))
    errors = []
    with torch.no_grad():
        for t in range(2000):
            tok = ids[t].view(1, 1)
            a = fp32(input_ids=tok, position_ids=torch.tensor([[c32.num_slots]]), cache=c32).logits
            b = bf16(input_ids=tok, position_ids=torch.tensor([[c16.num_slots]]), cache=c16).logits
            errors.append((a - b.float()).abs().max().item())
    errors = torch.tensor(errors)
    early, late = errors[100:400].mean(), errors[-300:].mean()
    assert c16.num_slots <= 64 and c16.seen == 2000
    assert late <= 1.5 * early + 1e-3, (early, late)
    assert errors.max() < 0.5


@pytest.mark.parametrize("dtype_mode", ["stored", "read"])
def test_positions_that_jump_stay_exact(dtype_mode):
    """Stored keys follow the caller's positions even when they skip ahead between steps."""
    model = tiny_llama("eager")
    cache = LaCache.from_model(model, budget=40, sinks=2, chunk=8)  # jumps land between compactions
    cache.rotation = dtype_mode  # force the path (float32 would pick "stored")
    ids = torch.randint(0, 96, (60,), generator=torch.Generator().manual_seed(7))
    ref = ReferenceStream(model, shift=True)
    worst, position = 0.0, 0
    for start, size in [(0, 30)] + [(30 + i, 1) for i in range(30)]:
        piece = ids[start : start + size]
        pos = torch.arange(position, position + size)
        kept = kept_sets(cache)
        with torch.no_grad():
            out = model(input_ids=piece[None], position_ids=pos[None], cache=cache).logits[0]
        worst = max(worst, (out - ref.step(piece, pos, kept)).abs().max().item())
        position += size + 3 * (start % 2)  # a gap of 3 positions every other step
    assert worst <= 1e-4
    assert cache.rotation == dtype_mode


@pytest.mark.parametrize("kind", sorted(CACHES))
def test_positions_reach_the_cache_when_attention_layers_do_not_pass_them(attn, kind):
    """transformers before 5.2x calls ``cache.update(k, v, layer)`` without the forward's keyword
    arguments: the cache must then take the forward's ``position_ids`` from the decoder hook, or a
    pass of several tokens after a compaction (a chat turn, a prefill chunk) is re-positioned wrongly."""
    from lacache.cache import BoundedCache

    model = tiny_llama(attn)
    cache = CACHES[kind](model, 24)
    cache.update = lambda keys, values, layer_idx, *args, **kwargs: BoundedCache.update(cache, keys, values, layer_idx)
    ids = torch.randint(0, 96, (120,), generator=torch.Generator().manual_seed(3))
    pieces = [20] + [3] * 20 + [1] * 10 + [2] * 15  # several-token passes right after compactions
    assert run_against_reference(model, cache, ids, pieces, "slots") <= 1e-4


@pytest.mark.parametrize("method", ["lacache-capped", "streaming"])
def test_generate_in_chunks_that_divide_the_period_keeps_the_stream_semantics(method):
    """``generate(prefill_chunk_size=k)`` cuts the prompt into chunks of ``k`` that transformers chooses: when ``k``
    divides the cache's period no chunk crosses a compaction point, so it gives exactly ``stream_generate``'s
    tokens (which splits at the points itself) and every layer holds the same tokens; a chunk size that crosses
    points compacts at each chunk's end instead (docs/method.md, "Compaction points")."""
    from lacache import make_cache

    model = tiny_llama("eager")
    prompt = torch.randint(0, 96, (1, 150), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        stream_cache = make_cache(method, model, 40, sinks=2)
        period = stream_cache.points.period
        assert period == 3  # chunk = 40 // 16 = 2
        eos = model.generation_config.eos_token_id
        tokens, _ = stream_generate(model, prompt, stream_cache, 30, prefill_chunk=64, eos_token_id=eos)
        cache = make_cache(method, model, 40, sinks=2)
        out = model.generate(prompt, cache=cache, max_new_tokens=30, do_sample=False, prefill_chunk_size=period)
    assert out[0, 150:].tolist() == tokens
    assert cache.seen == stream_cache.seen == 150 + len(tokens) - 1  # neither fed its last token
    for layer in range(4):
        assert cache.token_positions(layer).tolist() == stream_cache.token_positions(layer).tolist()
