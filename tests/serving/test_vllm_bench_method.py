"""`lacache bench vllm --method M` compares the full cache with method M, not always the default one
(the published capacity numbers were taken on a schedule that is no longer the default; run by
`make test-vllm`)."""

import os

import pytest

pytest.importorskip("vllm")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def test_the_capacity_part_runs_the_method_asked_for():
    from lacache import load_model
    from lacache.lab.bench import vllm_serving
    from lacache.lab.models import default_model_dir

    _, tokenizer = load_model(None)
    ids = tokenizer("Once upon a time there was a lighthouse keeper who")["input_ids"]
    rows = vllm_serving.bench_vllm_capacity(str(default_model_dir()), ids, new_tokens=40, requests=2, budget=48,
                                            blocks=8, step_tokens=128, method=["streaming", "lacache-capped"])
    assert [(r["method"], r["budget"]) for r in rows] == [("full", None), ("streaming", 48), ("lacache-capped", 48)]
    served = vllm_serving._ENGINES[-1].llm_engine.vllm_config.additional_config["lacache"]
    # reuse follows the bench's enable_prefix_caching=False (lacache's reuse is its prefix caching)
    assert served == {"method": "lacache-capped", "budget": 48, "reuse": False}
    assert all(r["tokens_per_s"] > 0 and r["peak_running"] >= 1 for r in rows)
    # the scheduler ran each request's prompt and new tokens (the last one is sampled, never fed back),
    # plus whatever preemption threw away
    for r in rows:
        assert r["scheduled_tokens"] == 2 * (len(ids) + 40 - 1) + r["recomputed_tokens"]
        assert r["bound_running"] == 2 and r["row_blocks"] == 1
    assert rows[0]["compactions"] == 0 and rows[1]["compactions"] > 0 and rows[2]["compactions"] > 0


def test_the_prefill_part_times_each_engine_alone_and_together():
    """``--part prefill``: the full cache runs the prompt in whole chunks; a bounded method stops its passes at
    compaction points (so it takes at least as many steps), and no pass attends more than its config's peak row."""
    from lacache import load_model
    from lacache.lab.bench import vllm_serving
    from lacache.lab.models import default_model_dir
    from lacache.lab.texts import load_essays

    _, tokenizer = load_model(None)
    ids = tokenizer(load_essays(max_chars=2000))["input_ids"][:120]
    rows = vllm_serving.bench_vllm_prefill(str(default_model_dir()), ids, budget=48, batch=2, step_tokens=32,
                                           repeats=1, method=["lacache-capped"])
    assert [(r["method"], r["mode"], r["requests"]) for r in rows] == [
        ("full", "alone", 1), ("full", "together", 2), ("lacache-capped", "alone", 1), ("lacache-capped", "together", 2)]
    full_alone, full_together, alone, together = rows
    assert full_alone["steps"] == -(-120 // 32) and -(-240 // 32) <= full_together["steps"] <= 2 * full_alone["steps"]
    assert full_alone["peak_row"] == full_alone["peak_row_bound"] == 120 and full_alone["compactions"] == 0
    assert alone["steps"] >= full_alone["steps"] and alone["compactions"] > 0
    assert 48 < alone["peak_row"] <= alone["peak_row_bound"] < 120
    assert together["peak_row"] <= together["peak_row_bound"]
    assert all(r["tokens_per_s"] > 0 and r["ttft_s"] <= r["seconds"] for r in rows)
    assert full_alone["vs_full"] == full_together["vs_full"] == 1.0 and alone["vs_full"] > 0 and together["vs_full"] > 0
