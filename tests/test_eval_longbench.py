"""LongBench: official metrics on hand-computed cases, the JSONL reader, prompts, runner and CLI."""

import argparse
import csv
import difflib
import json
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from conftest import tiny_llama
from lacache.cli import eval_longbench as lb_cli
from lacache.lab.evaluation import longbench as lb
from lacache.lab.evaluation import metrics as m
from lacache.lab.models import default_model_dir

FIXTURE = Path(__file__).parent / "fixtures" / "longbench"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(default_model_dir())


@pytest.fixture(scope="module")
def tiny(tokenizer):
    return tiny_llama("sdpa", layers=2, vocab_size=len(tokenizer))


# --- metrics -----------------------------------------------------------------------------------


def test_normalize_drops_case_punctuation_articles_and_extra_space():
    assert m.normalize_answer("The  Quick, brown fox!\n an Apple") == "quick brown fox apple"
    assert m.normalize_answer("theatre") == "theatre"  # articles only as whole words


def test_qa_f1_partial_overlap_and_normalisation():
    # "eiffel tower paris" vs "eiffel tower": P = 2/3, R = 1, F1 = 0.8
    assert m.qa_f1_score("The Eiffel Tower, Paris", "Eiffel Tower") == pytest.approx(0.8)
    assert m.qa_f1_score("the Cello.", "cello") == 1.0
    assert m.qa_f1_score("violin", "cello") == 0.0
    # repeated tokens count with multiplicity: "a b b" vs "b b c": common 2, P = R = 2/3
    assert m.qa_f1_score("x y y", "y y z") == pytest.approx(2 / 3)


def test_rouge_l_counts_distinct_words_like_the_rouge_package():
    # LCS "the cat on the mat" has distinct words {the, cat, on, mat}: 4; each side has 5 distinct
    # words, so P = R = 0.8 (a plain token LCS would give 5/6).
    assert m.rouge_l_score("the cat sat on the mat", "the cat is on the mat") == pytest.approx(0.8, abs=1e-6)
    # Two predicted sentences against one reference: union LCS {a, c} = 2, R = 2/2, P = 2/4, F = 2/3.
    assert m.rouge_l_score("a b. c d", "a c") == pytest.approx(2 / 3, abs=1e-6)
    assert m.rouge_l_score("", "a c") == 0.0 and m.rouge_l_score("...", "a c") == 0.0
    assert m.rouge_l_score("Same words here", "Same words here") == pytest.approx(1.0, abs=1e-6)


def test_classification_with_several_classes_matched():
    classes = ["Location", "Person", "Date", "Animal"]
    assert m.classification_score("Person or Location", "Location", all_classes=classes) == 0.5
    assert m.classification_score("Date", "Location", all_classes=classes) == 0.0
    assert m.classification_score("Location", "Location", all_classes=classes) == 1.0
    # a matched class that is a proper substring of the truth does not compete with it
    assert m.classification_score("other city", "other city", all_classes=["city", "other city", "country"]) == 1.0
    # as official: the class right after a removed one is skipped, so "b" stays and the score halves
    assert m.classification_score("ab", "ab", all_classes=["a", "b", "ab"]) == 0.5


def test_retrieval_and_count_scores():
    assert m.retrieval_score("Paragraph 3", "Paragraph 3") == 1.0
    assert m.retrieval_score("Paragraph 3 or Paragraph 13", "Paragraph 3") == 0.5
    assert m.retrieval_score("I do not know", "Paragraph 3") == 0.0
    assert m.count_score("There are 7 unique paragraphs among 9", 7) == 0.5
    assert m.count_score("7", "7") == 1.0 and m.count_score("seven", "7") == 0.0


def test_levenshtein_ratio_and_fuzz_ratio():
    # kitten/sitting: LCS "ittn" = 4, InDel distance 5, ratio 8/13 -> fuzz.ratio 62
    assert m.levenshtein_ratio("kitten", "sitting") == pytest.approx(8 / 13)
    assert m.fuzz_ratio("kitten", "sitting") == 62
    assert m.fuzz_ratio("kitten", "sitting") == round(100 * difflib.SequenceMatcher(None, "kitten", "sitting").ratio())
    assert m.fuzz_ratio("abc", "abc") == 100 and m.fuzz_ratio("", "") == 100
    assert m.fuzz_ratio("", "abc") == 0 and m.fuzz_ratio("abc", "xyz") == 0


def test_code_similarity_skips_comments_and_fences():
    prediction = "\n# the next line\n```python\nx = foo(1)\nreturn x\n"
    assert m.code_sim_score(prediction, "x = foo(2)") == pytest.approx(0.9)  # 18 / 20
    assert m.code_sim_score("// only a comment", "x = 1") == 0.0


def test_score_is_best_over_answers_after_postprocessing():
    assert m.score_sample("hotpotqa", "Paris", ["London", "Paris"]) == 1.0
    assert m.score_sample("hotpotqa_e", "the cello", ["cello"]) == 1.0
    assert m.postprocess("trec", "\n\nDate\nQuestion: next one") == "Date"
    assert m.postprocess("hotpotqa", "\nSaltmere\nmore") == "\nSaltmere\nmore"
    # trec scores only the first line, so the class named on line two does not count
    assert m.score_sample("trec", "Date\nLocation", ["Location"], ["Date", "Location"]) == 0.0
    assert m.score_sample("samsum", "\nthe cat sat\nthe dog ran", ["the cat sat"]) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="hotpotqa"):
        m.score_sample("dureader", "x", ["x"])
    assert m.dataset_score([1.0, 0.5, 0.0, 0.0]) == 37.5
    with pytest.raises(ValueError):
        m.dataset_score([])


# --- reader ------------------------------------------------------------------------------------


def test_reader_reads_every_file_with_official_fields():
    records = lb.load_folder(FIXTURE)
    names = lb.folder_datasets(FIXTURE)
    assert names == ["gov_report", "hotpotqa", "hotpotqa_e", "lcc", "passage_retrieval_en", "trec"]
    assert [r.dataset for r in records] == [n for n in names for _ in range(2)]
    trec = next(r for r in records if r.dataset == "trec")
    assert trec.id == "fx-trec-0001" and trec.answers == ["Other location"] and "Date" in trec.all_classes
    assert trec.input.endswith("Type:") and trec.language == "en" and trec.length > 0
    assert next(r for r in records if r.dataset == "hotpotqa").all_classes is None


def test_reader_limit_and_selection():
    records = lb.load_folder(FIXTURE, ["trec", "lcc"], limit=1)
    assert [(r.dataset, r.id) for r in records] == [("trec", "fx-trec-0001"), ("lcc", "fx-lcc-0001")]


def test_reader_errors(tmp_path):
    with pytest.raises(ValueError, match="not supported.*narrativeqa.*repobench-p"):
        lb.load_folder(FIXTURE, ["nonsense"])
    with pytest.raises(ValueError, match="qmsum.jsonl is not in"):
        lb.load_folder(FIXTURE, ["qmsum"])
    with pytest.raises(ValueError, match="does not exist"):
        lb.load_folder(tmp_path / "missing")
    with pytest.raises(ValueError, match="no <dataset>.jsonl"):
        lb.load_folder(tmp_path)
    (tmp_path / "trec.jsonl").write_text('{"input": "q"}\n')
    with pytest.raises(ValueError, match="lacks context, answers"):
        lb.load_folder(tmp_path)


_GOOD = {"input": "q", "context": "c", "answers": ["a"], "length": 3, "_id": "r1"}


@pytest.mark.parametrize("line, pattern", [
    (b"[1, 2]", r"a record must be a JSON object with input, context, .*; got a list"),
    (b"null", r"a record must be a JSON object.*; got null"),
    (b"42", r"a record must be a JSON object.*; got the number 42"),
    (b'"text"', r"a record must be a JSON object.*; got the string 'text'"),
    (json.dumps({**_GOOD, "answers": 5}).encode(), r'record r1: "answers" must be a list of strings.*got the number 5'),
    (json.dumps({**_GOOD, "answers": None}).encode(), r'record r1: "answers" must be a list of strings.*got null'),
    (json.dumps({**_GOOD, "answers": [1, 2]}).encode(), r'"answers" must be a list of strings.*got a list'),
    (json.dumps({**_GOOD, "length": "abc"}).encode(), r'record r1: "length" must be a whole number of words, e\.g\. '
                                                     r"1234; got the string 'abc'"),
    (json.dumps({**_GOOD, "length": -4}).encode(), r'"length" must be a whole number'),
    (json.dumps({**_GOOD, "context": {"a": 1}}).encode(), r'"context" must be a string or null; got a dict'),
    (json.dumps({**_GOOD, "all_classes": "x"})[:-1].encode(), r"not JSON"),
    ("caf\u00e9".encode("latin-1"), r"not UTF-8 text \(byte 3: invalid continuation byte\); the official files are UTF-8"),
])
def test_malformed_lines_name_the_file_and_line(tmp_path, line, pattern):
    """Each bad line is a ValueError naming ``<file>:<line>`` and what is wrong (here on line 2, after a good one)."""
    path = tmp_path / "trec.jsonl"
    path.write_bytes(json.dumps(_GOOD).encode() + b"\n" + line + b"\n")
    with pytest.raises(ValueError, match=pattern) as refused:
        lb.load_folder(tmp_path)
    assert str(refused.value).startswith(f"{path}:2: ")


def test_lenient_but_well_defined_fields(tmp_path):
    """What the official files contain in practice still reads: a BOM, a length as a string or a whole
    float, a single answer string, null context, and blank lines."""
    rows = [{**_GOOD, "length": "12", "answers": "only", "context": None}, {**_GOOD, "length": 7.0, "_id": 9}]
    text = "\n\n".join(json.dumps(r) for r in rows) + "\n"
    (tmp_path / "trec.jsonl").write_bytes(b"\xef\xbb\xbf" + text.encode())
    first, second = lb.load_folder(tmp_path)
    assert (first.length, first.answers, first.context) == (12, ["only"], "")
    assert (second.length, second.id) == (7, "9")


def test_hub_loading_without_datasets_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ValueError, match="pip install datasets"):
        lb.load_hub("THUDM/LongBench", ["trec"])


# --- prompts -----------------------------------------------------------------------------------


def _record(dataset="hotpotqa"):
    return lb.load_folder(FIXTURE, [dataset], limit=1)[0]


def test_template_is_filled():
    record = _record()
    prompt = lb.format_prompt(record)
    assert prompt.startswith("Answer the question based on the given passages.")
    assert record.context in prompt and prompt.endswith(f"Question: {record.input}\nAnswer:")
    assert "{" not in prompt
    assert lb.format_prompt(_record("lcc")).endswith("Next line of code:\n")


def test_chat_template_on_off_and_raw_datasets(tokenizer):
    record = _record()
    chat = tokenizer.decode(lb.encode_prompt(tokenizer, record)[0])
    assert chat.startswith("<|im_start|>system") and chat.endswith("<|im_start|>assistant\n")
    assert lb.format_prompt(record) in chat
    raw = tokenizer.decode(lb.encode_prompt(tokenizer, record, use_chat_template=False)[0])
    assert raw == lb.format_prompt(record)
    trec = _record("trec")  # few-shot: raw even for a chat model
    assert tokenizer.decode(lb.encode_prompt(tokenizer, trec)[0]) == lb.format_prompt(trec)


def test_middle_truncation_keeps_exact_head_and_tail():
    assert lb.truncate_middle(list(range(10)), 6) == [0, 1, 2, 7, 8, 9]
    assert lb.truncate_middle(list(range(10)), 7) == [0, 1, 2, 7, 8, 9]  # official: 2 * (N // 2)
    assert lb.truncate_middle([1, 2, 3], 6) == [1, 2, 3]


def test_truncated_prompt_keeps_instruction_and_question(tokenizer):
    record = _record()
    prompt = lb.format_prompt(record)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    out = lb.encode_prompt(tokenizer, record, use_chat_template=False, max_length=60)[0].tolist()
    assert abs(len(out) - 60) <= 2 and len(ids) > 200  # re-tokenising at the seam may merge a token
    text = tokenizer.decode(out)
    assert text.startswith(tokenizer.decode(ids[:30])) and text.endswith(tokenizer.decode(ids[-30:]))
    assert lb.encode_prompt(tokenizer, record, max_length=10_000).shape == lb.encode_prompt(tokenizer, record).shape


# --- runner ------------------------------------------------------------------------------------


def test_run_longbench_end_to_end_on_tiny_model(tokenizer, tiny):
    records = lb.load_folder(FIXTURE, ["hotpotqa", "trec", "passage_retrieval_en", "lcc", "gov_report"])
    trials = lb.run_longbench(tiny, tokenizer, ["full", "lacache"], records, budget=48,
                              method_options={"lacache": {"sinks": 2}}, prefill_chunk=32, max_new_tokens=12)
    assert len(trials) == 2 * len(records)
    assert [(t.dataset, t.id, t.method) for t in trials[:2]] == [(records[0].dataset, records[0].id, "full"),
                                                                 (records[0].dataset, records[0].id, "lacache")]
    assert all(t.slots is None for t in trials if t.method == "full")
    assert all(t.slots == 48 for t in trials if t.method == "lacache")
    for t, record in zip(trials[::2], records):
        assert t.length == lb.encode_prompt(tokenizer, record).shape[1] and t.length > 48
    for t in trials:
        assert 0 <= t.score <= 100 and t.answers
        expected = 100 * m.score_sample(t.dataset, t.prediction, t.answers,
                                        next(r.all_classes for r in records if r.id == t.id))
        assert t.score == pytest.approx(expected, abs=1e-3)
    summary = lb.summarize(trials)
    assert set(summary) == {"full", "lacache"}
    for scores in summary.values():
        datasets = ["hotpotqa", "trec", "passage_retrieval_en", "lcc", "gov_report"]
        assert list(scores) == [*datasets, "average"] and all(0 <= v <= 100 for v in scores.values())
        assert scores["average"] == pytest.approx(sum(scores[d] for d in datasets) / 5, abs=0.01)
    headers, rows = lb.summary_table(trials)
    assert headers[0] == "method" and headers[-1] == "average" and [r[0] for r in rows] == ["full", "lacache"]


def test_budget_fraction_and_unbounded_budget_matches_full(tokenizer, tiny):
    records = lb.load_folder(FIXTURE, ["passage_retrieval_en"], limit=1)
    n = lb.encode_prompt(tokenizer, records[0]).shape[1]
    half = lb.run_longbench(tiny, tokenizer, ["lacache"], records, budget=0.5, max_new_tokens=2,
                            method_options={"lacache": {"sinks": 2}})
    assert half[0].slots == int(0.5 * n)
    # a budget bigger than prompt + answer never compacts: same greedy answer as the full cache
    big = lb.run_longbench(tiny, tokenizer, ["full", "streaming"], records, budget=n + 64, max_new_tokens=6)
    assert big[0].prediction == big[1].prediction
    with pytest.raises(ValueError, match="prefill"):
        lb.run_longbench(tiny, tokenizer, ["full"], records, budget=8, prefill="none")


# --- command line ------------------------------------------------------------------------------


def _parse(argv):
    parser = argparse.ArgumentParser()
    lb_cli.add_parser(parser.add_subparsers(dest="task"))
    return parser.parse_args(["longbench", *argv])


def test_cli_parser_defaults_and_exclusive_sources():
    args = _parse(["--data", str(FIXTURE)])
    assert args.methods == "full,streaming,lacache,lacache-salient,tova,h2o" and args.budget == 1024
    assert args.prefill == "chunked" and args.prefill_chunk == 512 and args.max_length is None
    assert args.out == "runs/longbench" and not args.no_chat_template
    with pytest.raises(SystemExit):
        _parse(["--data", str(FIXTURE), "--dataset", "THUDM/LongBench"])
    with pytest.raises(SystemExit):
        _parse([])


def test_run_cli_on_fixture_with_injected_tiny_model(tokenizer, tiny, tmp_path, monkeypatch, capsys):
    import lacache.lab.models

    monkeypatch.setattr(lacache.lab.models, "load_model", lambda *a, **k: (tiny, tokenizer))
    args = _parse(["--data", str(FIXTURE), "--datasets", "trec, lcc", "--limit", "1", "--methods", "full,lacache",
                   "--budget", "40", "--option", "lacache.sinks=2", "--max-length", "90", "--out", str(tmp_path)])
    trials = lb_cli.run_cli(args)
    assert [(t.dataset, t.method) for t in trials] == [("trec", "full"), ("trec", "lacache"),
                                                       ("lcc", "full"), ("lcc", "lacache")]
    assert all(t.length <= 92 for t in trials)
    printed = capsys.readouterr().out
    assert "middle-truncated to 90 tokens" in printed and "average" in printed and "lacache" in printed
    with open(tmp_path / "longbench.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4 and rows[1]["slots"] == "40" and json.loads(rows[0]["answers"]) == ["Other location"]
    saved = json.loads((tmp_path / "longbench.json").read_text())
    assert saved["kind"] == "eval.longbench" and saved["schema"] == 1
    assert saved["max_length"] == 90 and saved["options"] == {"lacache": {"sinks": 2}}
    assert set(saved["summary"]) == {"full", "lacache"} and len(saved["samples"]) == 4


def test_run_cli_rejects_unknown_method_before_loading(monkeypatch):
    import lacache.lab.models

    monkeypatch.setattr(lacache.lab.models, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(ValueError, match="not known"):
        lb_cli.run_cli(_parse(["--data", str(FIXTURE), "--methods", "full,bogus"]))
    with pytest.raises(ValueError, match="not supported"):
        lb_cli.run_cli(_parse(["--data", str(FIXTURE), "--datasets", "vcsum", "--methods", "full"]))
