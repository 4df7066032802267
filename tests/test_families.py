"""The position shift is exact for every supported model family (tiny random configs, fp32).

Three oracles, none of which is lacache code:

* ``plain``: a ONE-layer model, StreamingLLM cache. Layer-0 keys and values depend only on the token
  itself, so the newest token's logits must equal a plain, cache-free forward over the kept token
  ids at positions ``0..n-1`` followed by the new token at ``n``, which is what the position shift
  means. (With more layers this is not an oracle: a plain forward re-encodes the kept tokens
  without the context they were cached with, so their deeper keys differ.)
* ``dynamic``: a budget above the stream length evicts nothing, so logits equal ``DynamicCache``'s
  (which uses transformers' own sliding-window cache layers for Gemma/Mistral).
* ``replay``: multi-layer LaCache (layers keep different tokens) and StreamingLLMCache under
  eviction against ``oracle_families.ReplayCache``: the model's own forward, with each layer shown
  exactly the tokens the cache under test reports, keys re-rotated to slot positions by the layer's
  own ``inv_freq``, and an explicit position-space mask (sliding windows included).
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

from lacache import LaCache, StreamingLLMCache
from oracle_families import ReplayCache, layer_inv_freqs

VOCAB = 96
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=4096,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
GEMMA = dict(query_pre_attn_scalar=16, sliding_window=8)  # 1/sqrt(head_dim) scaling like the others
# 3 layers: Gemma gets sliding, full, sliding
HYBRID_TYPES = ["sliding_attention", "full_attention", "sliding_attention"]

FAMILIES = {
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {}),
    "llama-llama3": (
        tf.LlamaConfig,
        tf.LlamaForCausalLM,
        dict(
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=10000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            )
        ),
    ),
    "llama-yarn": (
        tf.LlamaConfig,
        tf.LlamaForCausalLM,
        dict(
            rope_parameters=dict(
                rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=1024
            )
        ),
    ),
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, {}),
    "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, {}),  # q/k RMSNorm before RoPE
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM, dict(sliding_window=12)),  # every layer slides
    "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM, {}),  # fused qkv_proj
    "phi-partial": (tf.PhiConfig, tf.PhiForCausalLM, dict(partial_rotary_factor=0.5)),  # half the dims rotate
    "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM, GEMMA),  # sliding/full layers, soft-capping; eager only
    "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, GEMMA),  # + q/k norm, local/global rope bases
}
EAGER_ONLY = {"gemma2"}

XFAIL: dict[str, str] = {}


def build(family: str, attn: str = "sdpa", layers: int = 3, seed: int = 0, **overrides):
    config_cls, model_cls, extra = FAMILIES[family]
    settings = {**COMMON, **extra, "num_hidden_layers": layers, **overrides}
    if family.startswith("gemma") and "layer_types" not in overrides:
        settings["layer_types"] = (HYBRID_TYPES * layers)[:layers]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**settings, attn_implementation=attn)).eval()
    _sharpen(model)
    return model


@torch.no_grad()
def _sharpen(model, factor: float = 4.0):
    """Random init attends almost uniformly; sharpen q and k so position errors show in the logits."""
    for layer in model.model.layers:
        attn = layer.self_attn
        if hasattr(attn, "qkv_proj"):  # Phi-3: rows are [q | k | v]
            qk = (attn.config.num_attention_heads + attn.config.num_key_value_heads) * attn.head_dim
            attn.qkv_proj.weight[:qk].mul_(factor)
        else:
            attn.q_proj.weight.mul_(factor)
            attn.k_proj.weight.mul_(factor)
        for name in ("q_norm", "k_norm"):  # normalised after the projection: scale the norm instead
            norm = getattr(attn, name, None)
            if norm is not None:
                if "Gemma" in type(norm).__name__:  # x * (1 + weight)
                    norm.weight.copy_((1 + norm.weight) * factor - 1)
                else:
                    norm.weight.mul_(factor)


def family_params(attns=("sdpa", "eager")):
    out = []
    for family in FAMILIES:
        for attn in sorted({"eager" if family in EAGER_ONLY else a for a in attns}):
            marks = (
                [pytest.mark.xfail(strict=True, raises=ValueError, reason=XFAIL[family])]
                if family in XFAIL
                else []
            )
            out.append(pytest.param(family, attn, id=f"{family}-{attn}", marks=marks))
    return out


def kept_sets(cache) -> list[list[int]]:
    return [cache.token_positions(layer).tolist() for layer in range(len(cache.layers))]


def stream(total: int, seed: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (total,), generator=torch.Generator().manual_seed(seed))


# prefill longer than the budget (20), single-token decode, a multi-token chunk, more decode
PIECES = [30] + [1] * 14 + [5] + [1] * 9


# ----------------------------------------------------------------------------------- oracle: plain
@pytest.mark.parametrize("family, attn", family_params(("sdpa",)))
@torch.no_grad()
def test_one_layer_shift_equals_plain_forward_over_kept_tokens(family, attn):
    overrides = {"layer_types": ["sliding_attention"]} if family.startswith("gemma") else {}
    model = build(family, attn, layers=1, **overrides)
    cache = StreamingLLMCache.from_model(model, budget=16, sinks=2, chunk=2)
    ids = stream(40, seed=1)
    worst, evicted = 0.0, False
    for t in range(40):
        kept = cache.token_positions(0).tolist() if t else []
        # absolute positions: the cache must shift them to slots itself
        logits = model(input_ids=ids[None, t : t + 1], position_ids=torch.tensor([[t]]), cache=cache).logits[
            0, -1
        ]
        plain_ids = torch.cat([ids[kept], ids[t : t + 1]])[None]
        expected = model(input_ids=plain_ids, position_ids=torch.arange(plain_ids.shape[1])[None]).logits[
            0, -1
        ]
        worst = max(worst, (logits - expected).abs().max().item())
        evicted |= len(kept) < t
    assert evicted and cache.num_slots <= 16
    assert worst <= 1e-4, worst


# --------------------------------------------------------------------------------- oracle: dynamic
@pytest.mark.parametrize("family, attn", family_params(("sdpa",)))
@torch.no_grad()
def test_budget_above_length_equals_dynamic_cache(family, attn):
    model = build(family, attn)
    prompt = stream(12, seed=2)[None]
    kwargs = dict(max_new_tokens=16, do_sample=False, output_scores=True, return_dict_in_generate=True)
    full = model.generate(prompt, cache=DynamicCache(config=model.config), **kwargs)
    for make in (LaCache, StreamingLLMCache):
        bounded = model.generate(prompt, cache=make.from_model(model, budget=64, sinks=2), **kwargs)
        assert torch.equal(full.sequences, bounded.sequences), make.__name__
        worst = max((a - b).abs().max().item() for a, b in zip(full.scores, bounded.scores))
        assert worst <= 1e-5, (make.__name__, worst)


# ---------------------------------------------------------------------------------- oracle: replay
def replay_error(model, cache, ids: torch.Tensor, pieces: list[int], ref: ReplayCache | None = None) -> float:
    """Feed ``ids`` in ``pieces`` (absolute positions) through the cache and the replay reference; max |logit diff|."""
    ref = ReplayCache(model) if ref is None else ref
    worst, start = 0.0, 0
    with torch.no_grad():
        for size in pieces:
            piece = ids[None, start : start + size]
            pos = torch.arange(start, start + size)
            kept = kept_sets(cache) if start else [[] for _ in cache.layers]
            out = model(input_ids=piece, position_ids=pos[None], cache=cache).logits[0]
            mask = ref.begin(kept, pos)
            expected = model(input_ids=piece, position_ids=pos[None], cache=ref, attention_mask=mask).logits[
                0
            ]
            worst = max(worst, (out - expected).abs().max().item())
            assert cache.num_slots <= cache.budget
            start += size
    return worst


@pytest.mark.parametrize("family, attn", family_params())
def test_lacache_under_eviction_matches_replay(family, attn):
    model = build(family, attn)
    cache = LaCache.from_model(model, budget=20, sinks=2, chunk=2)
    err = replay_error(model, cache, stream(sum(PIECES), seed=3), PIECES)
    assert len({tuple(k) for k in kept_sets(cache)}) > 1, "layers should hold different tokens"
    assert err <= 1e-4, err


@pytest.mark.parametrize("family, attn", family_params(("eager",)))
def test_streaming_under_eviction_matches_replay(family, attn):
    model = build(family, attn)
    cache = StreamingLLMCache.from_model(model, budget=20, sinks=2, chunk=2)
    err = replay_error(model, cache, stream(sum(PIECES), seed=4), PIECES)
    assert err <= 1e-4, err


class _Snapshot(LogitsProcessor):
    """Records, after every forward inside generate(), which tokens each layer holds."""

    def __init__(self, cache):
        self.cache, self.kept = cache, []

    def __call__(self, input_ids, scores):
        self.kept.append(kept_sets(self.cache))
        return scores


@pytest.mark.parametrize("family, attn", [("gemma2", "eager"), ("mistral", "sdpa")])
@torch.no_grad()
def test_generate_with_sliding_window_layers_matches_replay(family, attn):
    """generate() builds the (sliding) masks itself from the cache's get_mask_sizes; it must agree with the replay."""
    model = build(family, attn)
    cache = LaCache.from_model(model, budget=20, sinks=2, chunk=2)
    prompt = stream(30, seed=5)[None]
    snap = _Snapshot(cache)
    out = model.generate(
        prompt,
        cache=cache,
        max_new_tokens=16,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
        logits_processor=LogitsProcessorList([snap]),
    )
    seq, ref = out.sequences[0], ReplayCache(model)
    kept_before = [[] for _ in cache.layers]
    starts = [(0, 30)] + [(30 + i, 1) for i in range(len(out.scores) - 1)]
    worst = 0.0
    for (start, size), scores, kept_after in zip(starts, out.scores, snap.kept):
        pos = torch.arange(start, start + size)
        mask = ref.begin(kept_before, pos)
        logits = model(
            input_ids=seq[None, start : start + size], position_ids=pos[None], cache=ref, attention_mask=mask
        ).logits[0, -1]
        worst = max(worst, (logits - scores[0]).abs().max().item())
        kept_before = kept_after
    assert len(out.scores) == 16 and cache.num_slots <= 20
    assert worst <= 1e-4, worst


def test_replay_reference_detects_a_wrong_rotation():
    """Negative control: rotating cached keys with the wrong frequencies must show up in the replay comparison."""
    model = build("qwen3", "sdpa")
    cache = LaCache.from_model(model, budget=20, sinks=2, chunk=2)
    for rotator in {id(r): r for r in cache.rotators}.values():
        rotator.inv_freq = rotator.inv_freq * 1.5
    assert replay_error(model, cache, stream(sum(PIECES), seed=3), PIECES) > 1e-2


def test_replay_reference_detects_a_missing_sliding_window():
    """Negative control for the masks: a reference whose sliding layers attend every slot must disagree."""
    model = build("gemma2", "eager")
    cache = LaCache.from_model(model, budget=20, sinks=2, chunk=2)
    ref = ReplayCache(model)
    ref.windows["sliding_attention"] = None
    assert replay_error(model, cache, stream(sum(PIECES), seed=3), PIECES, ref=ref) > 1e-2


# ---------------------------------------------------------------------------------- Gemma 3 detail
def test_gemma3_layers_get_their_own_rope_frequencies():
    """Gemma 3 keeps local (sliding) and global frequencies; each layer's keys turn with its own."""
    model = build("gemma3", "sdpa")
    local, full, _ = layer_inv_freqs(model)  # sliding, full, sliding
    assert not torch.allclose(local, full)  # rope_theta 10k (local) vs 1M (global)
    cache = LaCache.from_model(model, budget=20, sinks=2, chunk=2)
    assert torch.equal(cache.rotators[0].inv_freq, local) and torch.equal(cache.rotators[1].inv_freq, full)
    assert cache.rotators[0] is cache.rotators[2]  # one table per layer type


@pytest.mark.parametrize("window", [8, 32])
def test_gemma3_sliding_and_global_layers_are_exact(window):
    # The window must reach keys a compaction moved (sinks, ladder rungs): a window inside the dense
    # recent slots sees only keys whose net re-rotation is zero, whatever the frequencies.
    model = build("gemma3", "sdpa", sliding_window=window)
    cache = LaCache.from_model(model, budget=20, sinks=2, chunk=2)
    assert replay_error(model, cache, stream(sum(PIECES), seed=3), PIECES) <= 1e-4


def test_gemma3_one_rotator_for_every_layer_would_be_wrong():
    """Negative control: the global frequencies on the sliding layers must show up in the replay."""
    model = build("gemma3", "sdpa", sliding_window=32)
    cache = LaCache.from_model(model, budget=20, sinks=2, chunk=2)
    cache.rotators = [cache.rotators[1]] * len(cache.rotators)
    assert replay_error(model, cache, stream(sum(PIECES), seed=3), PIECES) > 1e-2
