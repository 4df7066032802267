"""RULER-style prompts are exact and their answers known; the harness scores, tabulates, draws and runs from the CLI."""

import argparse
import csv
import json
import re
from collections import Counter

import pytest
from transformers import AutoTokenizer

from conftest import tiny_llama
from lacache.cli import eval_ruler as ruler_cli
from lacache.lab.evaluation import ruler
from lacache.lab.evaluation.ruler import (
    TASK_NEW_TOKENS,
    TASKS,
    RulerTrial,
    build_ruler_prompt,
    mean_scores,
    plot_scores,
    run_ruler,
    string_match_all,
    summary_table,
)
from lacache.lab.models import default_model_dir

LENGTH = 320


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(default_model_dir())


def _text(tokenizer, prompt):
    return tokenizer.decode(prompt.input_ids[0].tolist())


def _haystack(tokenizer, prompt):
    """The prompt up to its final question, so counts exclude the question's own mention of the key."""
    text = _text(tokenizer, prompt)
    return text[: text.rindex("\n")]


def _span_texts(tokenizer, prompt):
    ids = prompt.input_ids[0].tolist()
    return [tokenizer.decode(ids[s:e]) for s, e in prompt.needle_spans]


@pytest.mark.parametrize("filler", ["grass", "essays"])
@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("length", [LENGTH, 700])
def test_prompts_have_the_exact_length_and_end_with_the_question(tokenizer, task, filler, length):
    prompt = build_ruler_prompt(tokenizer, task, length, seed=5, filler=filler)
    assert prompt.input_ids.shape == (1, length)
    assert prompt.task == task and prompt.references
    text = _text(tokenizer, prompt)
    endings = {"niah_multikey": f"The special magic number for {prompt.query} is",
               "niah_multivalue": f"The special magic numbers for {prompt.query} are",
               "variable_tracking": f"the value {prompt.query} are: VAR",
               "common_words": "the list are:"}
    assert text.endswith(endings[task])
    spans = prompt.needle_spans
    assert all(0 < s < e <= length for s, e in spans)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # ordered, not overlapping


@pytest.mark.parametrize("filler", ["grass", "essays"])
def test_multikey_needles_occur_once_and_the_reference_belongs_to_the_asked_key(tokenizer, filler):
    prompt = build_ruler_prompt(tokenizer, "niah_multikey", LENGTH, seed=2, filler=filler, keys=5)
    haystack = _haystack(tokenizer, prompt)
    needles = re.findall(r"One of the special magic numbers for (\S+) is: (\d{7})\.", haystack)
    assert len(needles) == 5 and len({k for k, _ in needles}) == 5 and len({v for _, v in needles}) == 5
    assert all(haystack.count(k) == 1 and haystack.count(v) == 1 for k, v in needles)
    assert prompt.references == [dict(needles)[prompt.query]]
    assert _text(tokenizer, prompt).count(prompt.query) == 3  # needle + twice in the question
    assert [bool(re.search(r"\d{7}", t)) for t in _span_texts(tokenizer, prompt)] == [True] * 5


@pytest.mark.parametrize("filler", ["grass", "essays"])
def test_multivalue_key_occurs_once_per_value(tokenizer, filler):
    prompt = build_ruler_prompt(tokenizer, "niah_multivalue", LENGTH, seed=4, filler=filler, values=3)
    haystack = _haystack(tokenizer, prompt)
    assert haystack.count(prompt.query) == 3 and len(set(prompt.references)) == 3
    assert all(haystack.count(v) == 1 for v in prompt.references)
    found = re.findall(rf"for {re.escape(prompt.query)} is: (\d{{7}})\.", haystack)
    assert sorted(found) == sorted(prompt.references)
    assert [t.strip() for t in _span_texts(tokenizer, prompt)] == [
        f"One of the special magic numbers for {prompt.query} is: {v}." for v in found
    ]


@pytest.mark.parametrize("filler", ["grass", "essays"])
def test_variable_chains_are_ordered_and_references_are_the_asked_chain(tokenizer, filler):
    prompt = build_ruler_prompt(tokenizer, "variable_tracking", 500, seed=1, filler=filler, chains=2, hops=3)
    haystack = _haystack(tokenizer, prompt)
    statements = re.findall(r"VAR ([A-Z]{5}) = (\w+)\.", haystack)
    assert len(statements) == 8 and len(prompt.needle_spans) == 8
    names, value = prompt.references, prompt.query
    assert len(names) == 4 and haystack.count(value) == 1
    assert (names[0], value) in statements
    where = [statements.index((names[0], value))]
    where += [statements.index((after, before)) for before, after in zip(names, names[1:])]
    assert where == sorted(where)  # each copy comes after the variable it copies
    assert [haystack.count(n) for n in names] == [2, 2, 2, 1]
    others = [s for s in statements if s[0] not in names]
    assert len(others) == 4 and all(s[1] != value for s in others)  # the distractor chain has its own value


def _entries(tokenizer, prompt):
    return re.findall(r"^(\d+)\. (\w+)$", _text(tokenizer, prompt), flags=re.M)


@pytest.mark.parametrize("length", [LENGTH, 1500])
def test_common_words_are_exactly_the_most_frequent(tokenizer, length):
    prompt = build_ruler_prompt(tokenizer, "common_words", length, seed=3)
    entries = _entries(tokenizer, prompt)
    assert [int(n) for n, _ in entries] == list(range(1, len(entries) + 1))
    counts = Counter(w for _, w in entries)
    top = {counts[w] for w in prompt.references}
    assert len(prompt.references) == 10 and len(top) == 1
    assert max(n for w, n in counts.items() if w not in prompt.references) < min(top)
    assert len(prompt.needle_spans) == 10 * top.pop()
    assert all(any(w in t for w in prompt.references) for t in _span_texts(tokenizer, prompt))
    pad = len(re.search(r"(\n+)Question:", _text(tokenizer, prompt)).group(1)) - 1
    longest = max(map(len, ruler._render_list(tokenizer, [w for _, w in entries])))
    assert 0 <= pad < longest  # padding is less than one entry


def test_common_words_options(tokenizer):
    prompt = build_ruler_prompt(tokenizer, "common_words", 600, seed=0, common=4, common_freq=9, rare_freq=2)
    counts = Counter(w for _, w in _entries(tokenizer, prompt))
    assert sorted(counts[w] for w in prompt.references) == [9] * 4
    assert max(n for w, n in counts.items() if w not in prompt.references) == 2
    with pytest.raises(ValueError, match="rare words"):
        build_ruler_prompt(tokenizer, "common_words", 3000, common_freq=2, rare_freq=1)


@pytest.mark.parametrize("task", TASKS)
def test_seeds_are_reproducible_and_differ(tokenizer, task):
    a, b = (build_ruler_prompt(tokenizer, task, LENGTH, seed=7) for _ in range(2))
    c = build_ruler_prompt(tokenizer, task, LENGTH, seed=8)
    assert a.input_ids.tolist() == b.input_ids.tolist() and a.references == b.references
    assert a.needle_spans == b.needle_spans
    assert a.input_ids.tolist() != c.input_ids.tolist() and a.references != c.references


def test_tasks_do_not_share_keys_under_one_seed(tokenizer):
    single = build_ruler_prompt(tokenizer, "niah_multikey", LENGTH, seed=0)
    multi = build_ruler_prompt(tokenizer, "niah_multivalue", LENGTH, seed=0)
    assert not set(single.references) & set(multi.references)


def test_prompt_errors(tokenizer):
    with pytest.raises(ValueError, match="too short"):
        build_ruler_prompt(tokenizer, "niah_multikey", 60)
    with pytest.raises(ValueError, match="too short"):
        build_ruler_prompt(tokenizer, "common_words", 30)
    with pytest.raises(ValueError, match="task"):
        build_ruler_prompt(tokenizer, "qa", LENGTH)
    with pytest.raises(ValueError, match="filler"):
        build_ruler_prompt(tokenizer, "niah_multikey", LENGTH, filler="lorem")


def test_vocabulary_has_no_word_inside_another():
    words = ruler.WORDS
    assert len(words) >= 150 and len(set(words)) == len(words)
    assert not [(a, b) for a in words for b in words if a != b and a in b]
    assert ruler._prune_words(["ant", "giant", "bee"]) == ("ant", "bee")


def test_string_match_all():
    refs = ["1234567", "7654321", "1111111", "2222222"]
    assert string_match_all(" 1234567, 1111111 and more", refs) == 0.5
    assert string_match_all("nothing here", refs) == 0.0
    assert string_match_all("1234567 7654321 1111111 2222222", refs) == 1.0
    assert string_match_all(" abcde, Fghij", ["ABCDE", "FGHIJ", "KLMNO"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        string_match_all("x", [])


def test_stop_ids_cut_one_line_answers_only(tokenizer):
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"][0]
    assert {newline, tokenizer.eos_token_id} <= ruler.stop_ids_for(tokenizer, "niah_multikey")
    assert ruler.stop_ids_for(tokenizer, "common_words") == {tokenizer.eos_token_id}


def test_harness_passes_the_right_settings_and_scores_the_decoded_answer(tokenizer, monkeypatch):
    calls = []

    def echo(model, input_ids, method, slots, options, prefill, chunk, new_tokens, stop_ids):
        calls.append((method, slots, options, prefill, chunk, new_tokens, stop_ids))
        return input_ids[0].tolist()  # echoing the prompt contains every reference

    monkeypatch.setattr(ruler, "greedy_answer", echo)
    trials = run_ruler(None, tokenizer, ["full", "streaming"], TASKS, [LENGTH], [0], budget=0.25,
                       prefill="chunked", prefill_chunk=64, method_options={"streaming": {"sinks": 2}})
    assert len(trials) == len(TASKS) * 2 and all(t.score == 1.0 and t.correct for t in trials)
    assert [c[5] for c in calls] == [TASK_NEW_TOKENS[t] for t in TASKS for _ in range(2)]
    assert all(c[1] == LENGTH // 4 and c[3:5] == ("chunked", 64) for c in calls)
    assert [c[2] for c in calls[:2]] == [{}, {"sinks": 2}]
    assert {t.budget for t in trials if t.method == "streaming"} == {LENGTH // 4}
    assert {t.budget for t in trials if t.method == "full"} == {None}

    monkeypatch.setattr(ruler, "greedy_answer", lambda *a, **k: [])
    empty = run_ruler(None, tokenizer, ["full"], ["niah_multivalue"], [LENGTH], [0, 1], budget=100)
    assert [t.score for t in empty] == [0.0, 0.0] and not any(t.correct for t in empty)
    with pytest.raises(ValueError, match="tasks"):
        run_ruler(None, tokenizer, ["full"], ["qa"], [LENGTH], [0], budget=0.5)


def _trial(method, task, length, score):
    return RulerTrial(method, task, length, 0, None, ["x"], "", score, score == 1.0, 0.0)


def test_summary_means_per_method_task_and_length():
    trials = [_trial("full", "niah_multikey", 500, 1.0), _trial("full", "niah_multikey", 500, 0.5),
              _trial("full", "niah_multikey", 1000, 0.0), _trial("lacache", "common_words", 500, 0.25)]
    means = mean_scores(trials)
    assert means == {("full", "niah_multikey", 500): 0.75, ("full", "niah_multikey", 1000): 0.0,
                     ("lacache", "common_words", 500): 0.25}
    headers, rows = summary_table(trials)
    assert headers == ["method", "task", "500 tokens", "1000 tokens", "mean"]
    assert rows[0] == ["full", "niah_multikey", 0.75, 0.0, 0.375]
    assert ["lacache", "common_words", 0.25, None, 0.25] in rows


def test_end_to_end_on_tiny_model(tokenizer, tmp_path):
    model = tiny_llama("sdpa", vocab_size=len(tokenizer))
    trials = run_ruler(model, tokenizer, ["full", "lacache"], TASKS, [LENGTH], [0], budget=0.5,
                       method_options={"lacache": {"sinks": 2}}, new_tokens={t: 3 for t in TASKS})
    assert [(t.task, t.method) for t in trials] == [(task, m) for task in TASKS for m in ("full", "lacache")]
    assert {t.budget for t in trials if t.method == "lacache"} == {LENGTH // 2}
    for t in trials:
        assert t.score == string_match_all(t.answer, t.references) and t.correct == (t.score == 1.0)
        assert t.needle_spans and t.seconds >= 0
    json.dumps(ruler.trial_dicts(trials))
    plot_scores(trials, tmp_path / "r.png", "test")
    assert (tmp_path / "r.png").stat().st_size > 5_000


def _cli_args(argv):
    parser = argparse.ArgumentParser()
    ruler_cli.add_parser(parser.add_subparsers(dest="task"))
    return parser.parse_args(["ruler", *argv])


def test_cli_defaults():
    args = _cli_args([])
    assert (args.methods == "full,streaming,lacache,lacache-capped,lacache-salient,lacache-group,tova,h2o,keydiff"
            and args.tasks == ",".join(TASKS))
    assert args.lengths == "500" and args.budget == 0.5 and args.out == "runs/ruler"
    assert args.filler == "grass" and args.prefill == "full" and args.dtype == "float32"


def test_cli_runs_writes_files_and_rejects_unknown_names(tokenizer, tmp_path, capsys):
    model = tiny_llama("sdpa", vocab_size=len(tokenizer))
    out = tmp_path / "ruler"
    args = _cli_args(["--methods", "full,lacache", "--tasks", "niah_multikey,variable_tracking",
                      "--lengths", str(LENGTH), "--seeds", "1", "--option", "lacache.sinks=2", "--out", str(out)])
    trials = ruler_cli.run_cli(args, model=model, tokenizer=tokenizer)
    assert len(trials) == 2 * 2
    assert "niah_multikey" in capsys.readouterr().out
    with open(out / "ruler.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4 and {r["method"] for r in rows} == {"full", "lacache"}
    payload = json.loads((out / "ruler.json").read_text())
    assert payload["budget"] == 0.5 and len(payload["trials"]) == 4
    assert payload["trials"][1]["options"] == {"sinks": 2}
    assert (out / "ruler.png").stat().st_size > 5_000
    with pytest.raises(ValueError, match="methods"):
        ruler_cli.run_cli(_cli_args(["--methods", "full,nope"]), model=model, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="tasks"):
        ruler_cli.run_cli(_cli_args(["--tasks", "qa"]), model=model, tokenizer=tokenizer)


def test_the_vllm_backend_gets_each_tasks_answer_length_and_stops(tokenizer):
    """``--backend vllm`` for RULER: each engine gets every prompt of its budget with that task's answer length and
    stop tokens (the transformers run's), and the answers are scored by the same string match."""
    asked = []

    class Engines:
        def answer(self, method, slots, options, prompts, new_tokens, stop_ids):
            asked.append((method, slots, list(new_tokens), list(stop_ids)))
            return [tokenizer("x", add_special_tokens=False)["input_ids"] for _ in prompts]

    tasks = ["niah_multikey", "common_words"]
    trials = ruler.run_ruler(None, tokenizer, ["full", "lacache-salient"], tasks, [300], [0], 0.5, vllm=Engines())
    assert [(t.task, t.method) for t in trials] == [(task, m) for task in tasks for m in ["full", "lacache-salient"]]
    newline = ruler.stop_ids_for(tokenizer, "niah_multikey")
    assert newline and asked == [
        (m, slots, [TASK_NEW[task] for task in tasks], [ruler.stop_ids_for(tokenizer, task) for task in tasks])
        for m, slots in (("full", None), ("lacache-salient", 150))]
    assert all(t.score == 0.0 for t in trials)


TASK_NEW = ruler.TASK_NEW_TOKENS
