"""A few checks on the real default model (SmolLM2-135M-Instruct, 30 layers, GQA 9/3)."""

import json

import pytest
import torch

from conftest import generate_like_full_cache
from lacache import LaCache, StreamingLLMCache, load_model
from lacache.cli import main as cli_main
from lacache.lab.texts import load_essays
from oracle_forward import ReferenceStream

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smol():
    return load_model()


def test_large_budget_generates_exactly_like_full_cache(smol):
    model, tok = smol
    ids = tok("The history of the lighthouse begins", return_tensors="pt")["input_ids"]
    same, worst = generate_like_full_cache(model, ids, LaCache.from_model(model, budget=256))
    assert same and worst <= 1e-4, worst


@pytest.mark.parametrize("make", [LaCache.from_model, StreamingLLMCache.from_model], ids=["lacache", "streaming"])
def test_eviction_matches_reference_on_real_model(smol, make):
    model, tok = smol
    ids = tok(load_essays(max_chars=4000), return_tensors="pt")["input_ids"][0, :140]
    cache = make(model, budget=64)
    ref = ReferenceStream(model)
    worst, start = 0.0, 0
    for size in [120] + [1] * 20:
        piece = ids[start : start + size]
        pos = torch.arange(cache.num_slots, cache.num_slots + size)
        kept = [cache.token_positions(layer).tolist() for layer in range(30)]
        with torch.no_grad():
            out = model(input_ids=piece[None], position_ids=pos[None], cache=cache).logits[0]
        worst = max(worst, (out - ref.step(piece, pos, kept)).abs().max().item())
        start += size
    assert cache.num_slots <= 64 and cache.seen == 140
    assert worst <= 1e-3  # logits of magnitude ~20; fp32 reordering noise only


def test_cli_generate_streams_with_bounded_cache(tmp_path, capsys):
    out = tmp_path / "run.json"
    code = cli_main(
        ["generate", "--budget", "64", "--max-new-tokens", "120", "--json", str(out), "--prompt", "Tell me a story."]
    )
    assert code == 0
    report = json.loads(out.read_text())
    assert report["new_tokens"] == 120
    assert report["cache_slots_per_layer"] <= 64
    # buffers of budget + 64 headroom slots: 2 x layers x kv_heads x head_dim x fp32 bytes x slots
    assert report["cache_bytes"] == 2 * 30 * 3 * 64 * 4 * (64 + 64)
    printed = capsys.readouterr()
    assert len(printed.out.strip()) > 100  # the text streamed to stdout
    assert "tokens/s" in printed.err


def test_cli_reports_bad_settings_clearly(capsys):
    assert cli_main(["generate", "--budget", "5", "--max-new-tokens", "5"]) == 2
    assert "budget=5 is too small" in capsys.readouterr().err
