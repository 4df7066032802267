"""Fault, load and soak: ``lacache serve`` on loopback driven for about a minute by chats, bursts, closed
streams, client timeouts, malformed and refused requests (``lacache bench vllm --part soak``'s own driver,
short and small): no 5xx, no stall, every malformed request refused with a 4xx, every good one answered,
the KV pool back to its idle value at the end and the server stopped cleanly. No timing is asserted."""

import json

import pytest

pytest.importorskip("vllm")
pytest.importorskip("prometheus_client")


def test_the_server_survives_a_minute_of_good_and_bad_clients(tmp_path):
    from lacache.lab.bench.vllm_chat import user_messages
    from lacache.lab.bench.vllm_soak import API_REFUSALS, NOT_EXPOSED, SoakSettings, fault_cases, soak
    from lacache.lab.texts import load_essays
    from lacache.vllm.engine_checks import REQUEST_REFUSALS

    # every refused request parameter is either sent through the API or known not to be settable there
    assert {r.parameter for r in REQUEST_REFUSALS} == set(API_REFUSALS) | set(NOT_EXPOSED)

    settings = SoakSettings(minutes=1.0, budget=64, pool_blocks=6, max_model_len=1024, answer_tokens=24,
                            message_words=20, chat_threads=2, burst=3, burst_every=15, stall_s=120, sample_s=10,
                            warmup_s=20, max_requests=400)
    messages = user_messages(load_essays(60_000), 120, settings.message_words)
    result = soak(settings, messages, str(tmp_path))
    summary = result["summary"]
    (tmp_path / "soak_summary.json").write_text(json.dumps(summary, indent=1))  # next to the server's log
    report = {k: summary[k] for k in ("requests", "failures", "pool", "server", "cases", "chat")}

    assert summary["server_5xx"] == 0, report
    assert summary["stalls"] == 0, report
    assert summary["malformed_not_4xx"] == 0, report
    assert summary["failures"] == [], report
    # every fault and edge case ran at least once
    names = {f"{kind}:{case}" for kind, case, _, _ in fault_cases(settings, "m", [1, 2, 3], ["w"] * 30)}
    assert names <= set(summary["cases"]), report
    assert summary["by_kind"]["chat"]["requests"] >= 2 and summary["by_kind"]["burst"]["requests"] >= 3, report
    assert summary["chat"]["reused_turns"] > 0, report  # the chats' next turns continued their kept caches
    pool = summary["pool"]
    assert pool["reset"]["status"] == 200 and pool["reset"]["answer"] == {"success": True}, report
    assert pool["back_to_idle"], report
    assert not pool["end_before_reset"].get("not_idle"), report
    assert summary["server"]["exit_code"] == 0 and summary["server"]["leftover_processes"] == [], report
    assert summary["server"]["log_fault_lines"] == 0, summary["server"]["log_fault_excerpt"]
    assert summary["ok"], report
    # the samples: the pool and the server's processes were read under load
    assert len(result["samples"]) >= 5
    assert all(s["rss_total_mb"] > 0 and s["processes"] >= 2 for s in result["samples"])
