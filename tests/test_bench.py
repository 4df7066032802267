"""Benchmarks return well-formed rows, memory stays flat where it must, the reference strategy keeps
LaCache's tokens, and every benchmark writes its table files and plot (tiny random models, seconds)."""

import argparse
import csv
import json

import pytest
import torch

from conftest import tiny_llama
from lacache import LaCache, StreamingLLMCache
from lacache.cache import SlotLayer
from lacache.cache.generation import stream_generate
from lacache.cli import bench as bench_cli
from lacache.lab.bench import (
    CacheStandIn,
    ReferenceLadderCache,
    bench_cache_update,
    bench_decode,
    bench_prefill,
    bench_stream,
    cache_summary,
    decode_summary,
    kv_bytes,
    model_geometry,
    plot_cache,
    plot_decode,
    plot_memory,
    plot_prefill,
    plot_stream,
)

PNG = b"\x89PNG"


def _is_png(path) -> bool:
    return path.is_file() and path.read_bytes()[:4] == PNG


@pytest.fixture(scope="module")
def model():
    return tiny_llama(layers=4, seed=1)


def test_kv_bytes_formula():
    assert kv_bytes(30, 3, 64, 4, 512) == 2 * 30 * 3 * 64 * 4 * 512
    assert kv_bytes(30, 3, 64, 2, 512, batch=3) == 3 * kv_bytes(30, 3, 64, 2, 512)
    assert kv_bytes(1, 1, 1, 1, 0) == 0


@pytest.mark.parametrize("make", [LaCache.from_model, StreamingLLMCache.from_model], ids=["lacache", "streaming"])
def test_kv_bytes_equals_bounded_cache_memory_after_long_stream(model, make):
    budget = 32
    cache = make(model, budget=budget)
    stream_generate(model, torch.tensor([[1, 2, 3, 4, 5]]), cache, max_new_tokens=160)
    g = model_geometry(model)
    assert (g["layers"], g["kv_heads"], g["head_dim"]) == (4, 2, 16)
    assert cache.seen > 4 * budget and cache.num_slots <= budget
    assert cache.memory_bytes() == kv_bytes(4, 2, 16, 4, budget + SlotLayer.headroom)


def test_bench_decode_rows_and_memory(model, tmp_path):
    methods = ("full", "streaming", "lacache", "tova", "h2o")
    rows = bench_decode(model, torch.tensor([[3, 1, 4, 1, 5, 9]]), methods, budget=24, tokens=40, window=10)
    assert [r["method"] for r in rows] == [m for m in methods for _ in range(4)]
    for r in rows:
        assert r["ms_per_token"] > 0 and r["tokens_per_s"] > 0 and r["rss_bytes"] > 0
        assert r["peak_rss_bytes"] >= r["rss_bytes"] * 0.9
        assert r["cuda_allocated_bytes"] is None
    assert [(r["first"], r["last"]) for r in rows[:4]] == [(2, 11), (12, 21), (22, 31), (32, 40)]
    full = [r for r in rows if r["method"] == "full"]
    assert [r["cache_slots"] for r in full] == [6 + 10, 6 + 20, 6 + 30, 6 + 39]
    assert full[-1]["cache_bytes"] == kv_bytes(4, 2, 16, 4, 6 + 39)  # grows with the stream
    for method in methods[1:]:
        mine = [r for r in rows if r["method"] == method]
        assert len({r["cache_bytes"] for r in mine}) == 1, method  # flat once full
        assert all(r["cache_slots"] <= 24 for r in mine)
    summary = decode_summary(rows)
    assert [s["method"] for s in summary] == list(methods)
    assert all(s["tokens"] == 40 and s["ms_per_token_mean"] > 0 for s in summary)
    plot_decode(rows, tmp_path / "decode.png")
    plot_memory(rows, tmp_path / "memory.png")
    assert _is_png(tmp_path / "decode.png") and _is_png(tmp_path / "memory.png")


def test_bench_stream_memory_is_flat(tmp_path):
    model = tiny_llama(layers=2, seed=3)
    result = bench_stream(model, torch.tensor([[7, 8, 9]]), tokens=400, budget=32, interval=100)
    samples = result["samples"]
    assert [s["tokens"] for s in samples] == [100, 200, 300, 400]
    assert all(s["num_slots"] <= 32 and s["tokens_per_s"] > 0 for s in samples)
    assert samples[-1]["seen"] == 3 + 399
    assert result["reference"]["tokens"] <= 32
    v = result["verdict"]
    assert v["cache_bytes_ratio"] == 1.0
    assert abs(v["rss_bytes_ratio"] - 1) < 0.05
    assert "cuda_allocated_bytes_ratio" not in v
    assert result["final"]["cache_bytes"] == result["expected_cache_bytes"] == kv_bytes(2, 2, 16, 4, 32 + 64)
    plot_stream(result, tmp_path / "stream.png")
    assert _is_png(tmp_path / "stream.png")


@pytest.mark.parametrize("layers,steps", [(6, 150), (30, 50)])
def test_reference_strategy_keeps_the_same_tokens_as_lacache(layers, steps):
    """Same shapes, same ladder schedule (no salient pool, no chunking): same tokens and values in every layer."""
    heads, dim, budget = 2, 16, 40
    stand_in = CacheStandIn(layers, heads, dim)
    ours = LaCache.from_model(stand_in, budget=budget, schedule="capped", chunk=0)
    ref = ReferenceLadderCache(stand_in.rotary_emb, layers, budget, track_tokens=True)
    assert ref.geometry == ours.policy.geometry and ref.window == ours.policy.window
    torch.manual_seed(0)
    seen = 0
    for step, q in enumerate([50] + [1] * steps):  # a prefill past the budget, then one token at a time
        pos = torch.arange(seen, seen + q)[None]
        for layer in range(layers):
            k, v = torch.randn(1, heads, q, dim), torch.randn(1, heads, q, dim)
            ours.update(k, v, layer, position_ids=pos)
            ref.update(k, v, layer)
        ref.end_step()
        seen += q
        if step % 10 == 0 or step > steps - 10:
            assert ours.num_slots == ref.num_slots <= budget
            for layer in range(layers):
                assert torch.equal(ours.token_positions(layer), ref.tokens[layer]), (step, layer)
                assert torch.equal(ours.layers[layer].values, ref.values[layer]), (step, layer)
    assert ours.policy.cursor == ref.cursor


def test_reference_rotates_all_keys_to_slot_positions():
    stand_in = CacheStandIn(4, 2, 16)
    ref = ReferenceLadderCache(stand_in.rotary_emb, 4, 16)
    k = torch.randn(1, 2, 10, 16)
    rotated, values = ref.update(k, torch.zeros(1, 2, 10, 16), 0)
    cos, sin = stand_in.rotary_emb(k, torch.arange(10)[None])
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    expected, _ = apply_rotary_pos_emb(k, k, cos, sin)
    assert torch.allclose(rotated, expected) and values.shape == (1, 2, 10, 16)


def test_bench_cache_update_rows(tmp_path):
    methods = ("lacache", "lacache-salient", "ladder-step", "streaming", "reference")
    rows = bench_cache_update([64], [6], kv_heads=2, head_dim=16, methods=methods, positions=("absolute", "slots"),
                              steps=40, ref_steps=10, warmup=4)
    assert len(rows) == 4 * 2 + 1
    for r in rows:
        assert r["ms_per_token"] > 0 and r["cache_slots"] <= 64
        assert r["steps"] == (10 if r["method"] in ("reference", "ladder-step", "lacache") else 40)
        if r["method"] != "reference":  # preallocated buffers: flat at budget + headroom
            assert r["cache_bytes"] == kv_bytes(6, 2, 16, 4, 64 + SlotLayer.headroom)
    summary = cache_summary(rows)
    assert [s["positions"] for s in summary] == ["absolute", "slots"]
    for s in summary:
        assert s["reference_over_lacache"] == pytest.approx(s["reference_ms"] / s["lacache_ms"])
    plot_cache(rows, tmp_path / "cache.png")
    assert _is_png(tmp_path / "cache.png")


def test_cache_benchmark_methods_come_from_the_registry():
    """Its real methods are the registry's bounded rules that need no attention; its own mechanisms
    (``reference``, ``ladder-step``) are named once, in the benchmark; the command's default is unchanged."""
    from lacache import registry
    from lacache.lab.bench import PSEUDO_METHODS, cache_methods, default_cache_methods

    real = [m for m in cache_methods() if m not in PSEUDO_METHODS]
    assert real == [m for m in registry.METHODS
                    if registry.method_spec(m).bounded and not registry.method_spec(m).needs_attention]
    assert {"lacache", "lacache-capped", "lacache-reference", "lacache-salient", "streaming"} <= set(real)
    assert registry.unbounded_method() not in real and not {"tova", "h2o"} & set(real)
    assert default_cache_methods() == (registry.default_method(), "reference", registry.baseline_method())
    assert _parse(["bench", "cache"]).methods == "lacache,reference,streaming"  # the same runs as before
    with pytest.raises(ValueError, match="not one of"):
        bench_cache_update([64], [2], methods=("h2o",))


def test_bench_prefill_beyond_trained_context(tmp_path):
    model = tiny_llama(layers=4, seed=2, max_position_embeddings=256)
    ids = torch.randint(0, 96, (1, 600), generator=torch.Generator().manual_seed(0))
    result = bench_prefill(model, ids, budget=64, prefill_chunk=100)
    rows, s = result["rows"], result["summary"]
    assert [r["tokens"] for r in rows] == [100, 200, 300, 400, 500, 600]
    assert all(r["cache_slots"] <= 64 for r in rows)
    assert len({r["cache_bytes"] for r in rows[1:]}) == 1  # flat after the first chunks
    assert s["full_cache_bytes"] == kv_bytes(4, 2, 16, 4, 600) > s["cache_bytes"]
    assert s["beyond_trained_context"] and s["trained_context"] == 256
    assert s["tokens_per_s"] > 0 and s["peak_rss_bytes"] > 0
    full = bench_prefill(model, ids[:, :200], budget=64, prefill_chunk=100, method="full")
    assert full["summary"]["cache_bytes"] == kv_bytes(4, 2, 16, 4, 200)
    plot_prefill(result, tmp_path / "prefill.png", full=full)
    assert _is_png(tmp_path / "prefill.png")


def _parse(argv):
    parser = argparse.ArgumentParser(prog="lacache")
    bench_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_bench_vllm_accepts_the_prefill_part():
    """``--part prefill`` parses without vLLM; its prompt and batch default larger than the other parts'."""
    from lacache.cli.bench_vllm import part_defaults

    args = part_defaults(_parse(["bench", "vllm", "--part", "prefill", "--budget", "127", "--step-tokens", "128"]))
    assert (args.part, args.prompt_tokens, args.batch, args.repeats, args.dtype) == ("prefill", 2048, 4, 3, "float32")
    args = part_defaults(_parse(["bench", "vllm", "--part", "prefill", "--prompt-tokens", "512", "--batch", "2",
                                 "--repeats", "1"]))
    assert (args.prompt_tokens, args.batch, args.repeats) == (512, 2, 1)
    args = part_defaults(_parse(["bench", "vllm", "--part", "stream"]))  # the other parts keep their defaults
    assert (args.prompt_tokens, args.batch) == (64, 2)
    with pytest.raises(SystemExit):
        _parse(["bench", "vllm", "--part", "prefill", "--repeats", "0"])


def _read_csv(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_cli_writes_tables_files_and_plots(tmp_path, capsys):
    out = str(tmp_path)
    tiny = ["--tiny", "--quiet", "--out", out]
    bench_cli.run_cli(_parse(["bench", "decode", "--tokens", "20", "--budget", "24", "--window", "10",
                              "--methods", "full,lacache", *tiny]))
    bench_cli.run_cli(_parse(["bench", "memory", "--from", str(tmp_path / "decode.json"), "--out", out, "--quiet"]))
    bench_cli.run_cli(_parse(["bench", "stream", "--tokens", "200", "--budget", "24", "--interval", "100",
                              "--tiny-layers", "2", *tiny]))
    bench_cli.run_cli(_parse(["bench", "cache", "--budgets", "48", "--layers", "6", "--kv-heads", "2",
                              "--head-dim", "16", "--steps", "20", "--ref-steps", "5", "--warmup", "2",
                              "--quiet", "--out", out]))
    bench_cli.run_cli(_parse(["bench", "prefill", "--tokens", "200", "--budget", "32", "--prefill-chunk", "64",
                              "--random", *tiny]))
    printed = capsys.readouterr().out
    from lacache.lab.runinfo import environment

    for name in ("decode", "memory", "stream", "cache", "prefill"):
        assert _is_png(tmp_path / f"{name}.png"), name
        assert _read_csv(tmp_path / f"{name}.csv"), name
        payload = json.loads((tmp_path / f"{name}.json").read_text())
        assert payload["rows" if name != "stream" else "samples"]
        assert payload["kind"] == f"bench.{name}" and payload["schema"] == 1, name
        assert set(payload["environment"]) == set(environment("cpu")) and payload["run"]["torch"], name
    assert "ms/tok mean" in printed and "ref/lacache" in printed and "verdict:" in printed and "FLAT" in printed
    assert {r["method"] for r in _read_csv(tmp_path / "memory.csv")} == {"full", "lacache"}
    with pytest.raises(ValueError, match="not known"):
        bench_cli.run_cli(_parse(["bench", "decode", "--methods", "nope", *tiny]))
    with pytest.raises(ValueError, match="bounded"):
        bench_cli.run_cli(_parse(["bench", "stream", "--method", "full", *tiny]))


def test_cache_only_stream_is_flat_and_matches_the_formula():
    from lacache.lab.bench import bench_cache_stream, kv_bytes

    result = bench_cache_stream(tokens=600, budget=64, layers=2, kv_heads=2, head_dim=16, interval=100)
    assert [s["tokens"] for s in result["samples"]] == [100, 200, 300, 400, 500, 600]
    assert result["verdict"]["flat"] and result["verdict"]["cache_bytes_ratio"] == 1.0
    # the reference is the reading right after the first compaction was applied, one token past the overflow
    assert result["filled"]["tokens"] == 65 and result["reference"]["tokens"] == 66
    assert result["verdict"]["filled_tokens"] == 65 and "rss_bytes_ratio_vs_filled" in result["verdict"]
    assert all(s["num_slots"] <= 64 for s in result["samples"])
    assert result["final"]["cache_bytes"] == kv_bytes(2, 2, 16, 4, 64 + 64) == result["expected_cache_bytes"]
