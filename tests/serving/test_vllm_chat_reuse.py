"""A chat through vLLM's OpenAI-compatible server with the ``openai`` client, unchanged: from the second
turn on, each turn continues the previous one's cache, and the usage says how many prompt tokens were
not recomputed (``lacache bench vllm --part chat``'s own driver, three turns, one server)."""

import pytest

pytest.importorskip("vllm")
pytest.importorskip("openai")


def test_an_unchanged_openai_client_gets_each_turn_from_the_last_ones_cache(tmp_path):
    from lacache.lab.bench.vllm_chat import CHAT_SERVERS, bench_vllm_chat, user_messages
    from lacache.lab.models import default_model_dir
    from lacache.lab.texts import load_essays

    messages = user_messages(load_essays(20_000), 3, 30)
    rows = bench_vllm_chat(str(default_model_dir()), messages, 64, "lacache-capped", 24, 2048, "float32",
                           str(tmp_path), servers=CHAT_SERVERS[:1])
    assert [r["turn"] for r in rows] == [1, 2, 3]
    assert rows[0]["cached_tokens"] == 0
    for previous, row in zip(rows, rows[1:]):
        # everything the previous turn's cache had seen: its prompt and its answer but the last token
        assert row["cached_tokens"] == previous["prompt_tokens"] + previous["answer_tokens"] - 1
        assert row["computed_tokens"] < row["prompt_tokens"] // 2
    assert rows[-1]["prompt_tokens"] > 64  # past the budget: the kept caches were compacted ones
