"""``lacache chat``: multi-turn chat through stdin, one bounded cache per conversation."""

import io
import re
import sys

import pytest
import torch

from conftest import bundled_tokenizer_and_tiny_model
from lacache import generation
from lacache.cli import chat

STATS = re.compile(r"\[stats\] (\w+): (\d+) slots/layer(?: \(budget (\d+)\))? \| (\d+) tokens seen \| cache ([\d.]+) MiB")


@pytest.fixture(scope="module")
def tok_and_model():
    tokenizer, model = bundled_tokenizer_and_tiny_model()
    assert tokenizer.chat_template
    return tokenizer, model


def _run(monkeypatch, capsys, lines, tok_and_model, *argv):
    tokenizer, model = tok_and_model
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(f"{line}\n" for line in lines)))
    args = chat.build_parser().parse_args(["--temperature", "0", *argv])
    records = chat.run_cli(args, model=model, tokenizer=tokenizer)
    return records, capsys.readouterr().out


def _stats(out):
    return [(m[1], int(m[2]), int(m[3]) if m[3] else None, int(m[4]), float(m[5])) for m in STATS.finditer(out)]


def test_parser_via_subparsers():
    import argparse

    parser = argparse.ArgumentParser()
    chat.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["chat", "--method", "streaming", "--budget", "64", "--max-new-tokens", "8"])
    assert (args.command, args.method, args.budget, args.max_new_tokens) == ("chat", "streaming", 64, 8)


def test_many_turns_stay_within_budget(monkeypatch, capsys, tok_and_model):
    questions = [f"Question number {i}: what about the lighthouse?" for i in range(8)]
    lines = [questions[0], "/stats", *questions[1:], "/stats", "/quit", "never read"]
    records, out = _run(monkeypatch, capsys, lines, tok_and_model, "--budget", "48", "--max-new-tokens", "12")
    assert len(records) == 8
    for record in records:
        assert record.reply and record.reply in out  # the streamed text is the reply
        assert record.slots <= 48
    # only each new turn is fed: seen grows by the turn's tokens + the reply (whose last token waits)
    seen = 0
    for record in records:
        seen += record.fed_tokens + record.new_tokens - 1
        assert record.seen == seen
    assert records[-1].seen > 4 * 48  # far past the budget: compaction happened
    assert all(r.fed_tokens < 40 for r in records[1:])  # not the whole conversation again
    stats = _stats(out)
    assert len(stats) == 2
    assert stats[0][:4] == ("lacache", records[0].slots, 48, records[0].seen)
    assert stats[1][:4] == ("lacache", records[-1].slots, 48, records[-1].seen)
    assert stats[1][4] > 0
    assert "RSS" in out and "never read" not in out


def test_fed_tokens_are_the_conversation_template(monkeypatch, capsys, tok_and_model):
    """Everything the cache was fed, in order, reads as the chat template of the conversation."""
    tokenizer, _ = tok_and_model
    fed = []
    real = generation.stream_tokens

    def spy(model, input_ids, cache, *args, **kwargs):
        fed.extend(input_ids[0].tolist())
        for token_id in real(model, input_ids, cache, *args, **kwargs):
            fed.append(token_id)
            yield token_id
        fed.pop()  # the last token is yielded but not fed

    monkeypatch.setattr(generation, "stream_tokens", spy)
    lines = ["Hello there", "Tell me more", "And then?"]
    records, _ = _run(monkeypatch, capsys, lines, tok_and_model, "--method", "full", "--max-new-tokens", "6")
    messages = []
    for line, record in zip(lines, records):
        messages += [{"role": "user", "content": line}, {"role": "assistant", "content": record.reply}]
    expected = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
    assert tokenizer.decode(fed, skip_special_tokens=False).startswith(expected)
    assert records[-1].seen == len(fed)


def test_reset_starts_fresh(monkeypatch, capsys, tok_and_model):
    fresh, _ = _run(monkeypatch, capsys, ["Where is the map?"], tok_and_model, "--budget", "48", "--max-new-tokens", "10")
    lines = ["First topic, long enough to matter", "Second turn", "/reset", "/stats", "Where is the map?", "/stats"]
    records, out = _run(monkeypatch, capsys, lines, tok_and_model, "--budget", "48", "--max-new-tokens", "10")
    assert "[reset]" in out
    after = records[-1]
    assert (after.reply, after.seen, after.fed_tokens) == (fresh[0].reply, fresh[0].seen, fresh[0].fed_tokens)
    stats = _stats(out)
    assert stats[0][1] == 0 and stats[0][3] == 0  # right after /reset: an empty cache
    assert stats[1][3] == fresh[0].seen


def test_eof_and_sampling(monkeypatch, capsys, tok_and_model):
    tokenizer, model = tok_and_model
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\nagain"))  # no trailing newline, then EOF
    args = chat.build_parser().parse_args(
        ["--method", "streaming", "--budget", "40", "--max-new-tokens", "5", "--temperature", "1.0", "--seed", "3"]
    )
    first = chat.run_cli(args, model=model, tokenizer=tokenizer)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\nagain"))
    second = chat.run_cli(args, model=model, tokenizer=tokenizer)
    assert len(first) == 2 and [r.reply for r in first] == [r.reply for r in second]  # seeded
    assert "> " not in capsys.readouterr().out  # no prompt marker on a pipe


@pytest.mark.integration
def test_real_model_two_turns(monkeypatch, capsys):
    from lacache.lab.models import load_model

    torch.set_num_threads(1)
    model, tokenizer = load_model()
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is the capital of France?\nAnd of Italy?\n/stats\n/quit\n"))
    args = chat.build_parser().parse_args(["--budget", "64", "--max-new-tokens", "8", "--temperature", "0"])
    records = chat.run_cli(args, model=model, tokenizer=tokenizer)
    out = capsys.readouterr().out
    print(out, file=sys.stderr)
    assert len(records) == 2 and all(r.reply.strip() for r in records)
    assert all(r.slots <= 64 for r in records)
    (stats,) = _stats(out)
    assert stats[1] <= 64 and stats[3] == records[-1].seen


def test_demo_asks_the_shipped_questions_and_keeps_memory_flat(monkeypatch, capsys, tok_and_model):
    """The endless-conversation demo: shipped questions, cycled past their number, a stats line per
    turn with a flat cache size once the budget is reached, a repetition measure at the end."""
    from lacache.lab.demo import DEMO_QUESTIONS

    turns = len(DEMO_QUESTIONS) + 2
    records, out = _run(monkeypatch, capsys, [], tok_and_model, "--demo", "--turns", str(turns), "--budget", "48",
                        "--max-new-tokens", "6")
    assert len(records) == turns
    asked = [line[2:] for line in out.splitlines() if line.startswith("> ")]
    assert asked == [DEMO_QUESTIONS[i % len(DEMO_QUESTIONS)] for i in range(turns)]
    stats = _stats(out)
    assert len(stats) == turns and stats[-1][3] > 5 * 48, "the conversation passes many times the budget"
    full = [s for s in stats if s[1] >= 40]
    assert all(s[1] <= 48 for s in stats) and len({s[4] for s in full}) == 1, "memory stays flat once full"
    *_, summary, full = out.strip().splitlines()
    assert summary.startswith(f"[demo] lacache: {turns} turns") and "distinct 4-grams per 500 tokens" in summary
    measured = re.search(r"the same conversation \((\d+) tokens\) in a full DynamicCache, measured: ([\d.]+) MiB, "
                         r"([\d.]+)x this cache's ([\d.]+) MiB", full)
    assert measured, full
    assert int(measured[1]) > 5 * 48 and float(measured[3]) > 3  # the full cache holds every token
    assert out.startswith(f"[demo] {turns} questions to ")  # the banner: what to watch, how long, the endless run


def test_the_demo_is_short_by_default(monkeypatch, capsys, tok_and_model):
    records, out = _run(monkeypatch, capsys, [], tok_and_model, "--demo")
    assert len(records) == chat.DEMO_DEFAULTS["turns"]
    assert "in one lacache cache of 64 slots per layer, answers up to 48 tokens (about a minute" in out
    assert all(r.new_tokens <= 48 for r in records) and records[-1].seen > 64


def test_turns_needs_the_demo(monkeypatch, capsys, tok_and_model):
    with pytest.raises(ValueError, match="--turns 3 needs --demo"):
        _run(monkeypatch, capsys, [], tok_and_model, "--turns", "3")


def test_distinct_ngram_share():
    from lacache.lab.demo import distinct_ngram_share, repetition_summary

    assert distinct_ngram_share(list(range(1000)), n=4, window=500) == [1.0, 1.0]
    loop = [1, 2, 3, 4, 5] * 200
    shares = distinct_ngram_share(loop, n=4, window=500)
    assert len(shares) == 2 and all(s == pytest.approx(5 / 497) for s in shares)
    assert distinct_ngram_share([1, 2, 3], n=4) == []
    assert "too few tokens" in repetition_summary([1, 2])
    with pytest.raises(ValueError, match="n=0"):
        distinct_ngram_share([1, 2], n=0)
