"""Streaming perplexity: numbers that can be checked, and the files the CLI writes."""

import csv
import json

import numpy as np
import pytest
import torch

from conftest import save_tiny_model, tiny_llama
from lacache.cli import main as cli_main
from lacache.cli import parse_method_options
from lacache.lab.evaluation.perplexity import evaluate_ppl_grid, streaming_nll, window_ppl
from lacache.lab.evaluation.report import format_table, ppl_table_rows
from lacache.registry import make_cache


def test_full_cache_streaming_nll_equals_one_forward():
    model = tiny_llama("sdpa")
    ids = torch.randint(0, 96, (80,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logp = torch.log_softmax(model(ids[None]).logits[0].double(), -1)
    expected = -logp[:-1].gather(1, ids[1:, None])[:, 0].numpy()
    for step in (1, 7):
        nll = streaming_nll(model, ids, make_cache("full", model), step=step)
        assert np.allclose(nll, expected, atol=1e-4)
    nll = streaming_nll(model, ids, make_cache("lacache", model, budget=128), step=1)
    assert np.allclose(nll, expected, atol=1e-4)  # budget above the length changes nothing


def test_grid_runs_every_method_and_budget_once():
    model = tiny_llama("sdpa")
    ids = torch.randint(0, 96, (90,), generator=torch.Generator().manual_seed(1))
    results = evaluate_ppl_grid(
        model, ids, ["full", "streaming", "lacache", "tova", "h2o", "knorm"], [24, 40], window=30, progress=False
    )
    assert [(r.method, r.budget) for r in results] == [
        ("full", None), ("streaming", 24), ("streaming", 40), ("lacache", 24), ("lacache", 40),
        ("tova", 24), ("tova", 40), ("h2o", 24), ("h2o", 40), ("knorm", 24), ("knorm", 40),
    ]
    for r in results:
        assert r.ppl > 1 and len(r.windows) == 3 and r.windows[0][:2] == (1, 31)
    # eviction changes the predictions of a bounded cache
    by_key = {(r.method, r.budget): r.ppl for r in results}
    assert by_key[("lacache", 24)] != by_key[("full", None)]
    headers, rows = ppl_table_rows(results)
    assert headers == ["method", "budget 24", "budget 40"] and rows[0][0] == "full"
    assert "lacache" in format_table(headers, rows)


def test_window_ppl():
    nll = np.log(np.array([2.0, 2.0, 8.0, 8.0, 4.0]))
    assert window_ppl(nll, 2) == [(1, 3, pytest.approx(2.0)), (3, 5, pytest.approx(8.0)), (5, 6, pytest.approx(4.0))]


def test_parse_method_options():
    assert parse_method_options(["lacache.span=9", "lacache.overlap=7", "h2o.window=none", "x.f=0.5"]) == {
        "lacache": {"span": 9, "overlap": 7}, "h2o": {"window": None}, "x": {"f": 0.5}
    }
    with pytest.raises(ValueError, match="METHOD.KEY=VALUE"):
        parse_method_options(["span9"])


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny random 4-layer Llama saved with the bundled tokenizer, so the CLI runs end to end in seconds."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny"), layers=4)


def test_cli_eval_ppl_writes_table_csv_json_png(tiny_model_dir, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    out = tmp_path / "out"
    code = cli_main([
        "eval", "ppl", "--model", str(tiny_model_dir), "--text-file", str(text), "--tokens", "100",
        "--budgets", "32,48", "--methods", "full,lacache,knorm", "--window", "50",
        "--option", "lacache.sinks=2", "--out", str(out), "--no-progress",
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "budget 32" in printed and "lacache" in printed
    rows = list(csv.DictReader(open(out / "ppl.csv")))
    assert set(rows[0]) == {"text", "method", "budget", "step", "first", "last", "ppl"}
    overall = [r for r in rows if r["first"] == "1" and r["last"] == "100"]
    assert {(r["method"], r["budget"]) for r in overall} == {
        ("full", ""), ("lacache", "32"), ("lacache", "48"), ("knorm", "32"), ("knorm", "48"),
    }
    report = json.loads((out / "ppl.json").read_text())
    assert report["tokens"] == 100 and len(report["results"]) == 5
    lacache_run = next(r for r in report["results"] if r["method"] == "lacache")
    assert lacache_run["options"] == {"sinks": 2} and lacache_run["cache"]["sinks"] == 2
    assert (out / "ppl.png").stat().st_size > 10_000


def test_cli_eval_rejects_unknown_method(capsys):
    assert cli_main(["eval", "ppl", "--methods", "full,snapkv"]) == 2
    assert "snapkv" in capsys.readouterr().err


def test_a_batch_of_texts_gives_each_text_its_own_stream():
    """Streaming several texts as one batch predicts each exactly as streaming it alone (index-only rules;
    a content rule such as key norm can break a near-tie of two scores differently in a batch)."""
    model = tiny_llama("sdpa")
    rows = torch.randint(0, 96, (3, 70), generator=torch.Generator().manual_seed(5))
    for method, budget in (("lacache", 24), ("lacache-capped", 24), ("streaming", 24), ("full", None)):
        together = streaming_nll(model, rows, make_cache(method, model, budget), step=1)
        assert together.shape == (3, 69)
        for i in range(3):
            alone = streaming_nll(model, rows[i], make_cache(method, model, budget), step=1)
            assert np.allclose(together[i], alone, atol=1e-4), (method, i)
    results = evaluate_ppl_grid(model, rows, ["full", "streaming", "lacache"], [24], window=30, progress=False,
                                texts=["a", "b", "c"])
    assert [(r.text, r.method) for r in results][:3] == [("a", "full"), ("b", "full"), ("c", "full")]
    assert results[0].step == 256  # the full cache is exact at any step, so it is fed in big forwards
    headers, table = ppl_table_rows(results)
    assert headers[:2] == ["text", "method"] and len(table) == 9
    from lacache.lab.evaluation.report import gap_table_rows

    gap_headers, gaps = gap_table_rows(results)
    assert gap_headers == ["text", "method", "budget 24"] and [row[:2] for row in gaps] == [
        ["a", "lacache"], ["b", "lacache"], ["c", "lacache"]]
    with pytest.raises(ValueError, match="texts"):
        evaluate_ppl_grid(model, rows, ["full"], [24], progress=False, texts=["a"])


def test_gap_closed():
    from lacache.lab.evaluation.perplexity import gap_closed

    assert gap_closed(8.0, 10.0, 6.0) == pytest.approx(0.5)
    assert gap_closed(6.0, 10.0, 6.0) == pytest.approx(1.0)
    assert gap_closed(11.0, 10.0, 6.0) == pytest.approx(-0.25)
    assert gap_closed(5.0, 6.0, 6.0) is None  # StreamingLLM already at full: nothing to close


def test_cli_variants_and_offline_texts(tiny_model_dir, tmp_path, capsys):
    pytest.importorskip("sqlite3")
    out = tmp_path / "out"
    code = cli_main([
        "eval", "ppl", "--model", str(tiny_model_dir), "--texts", "essays,kjv", "--tokens", "60",
        "--budgets", "32", "--methods", "full,streaming,lacache", "--variant", "g2=lacache,group=2,sinks=2",
        "--out", str(out), "--no-progress",
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "Share of the streaming -> full gap closed" in printed  # the registry's baseline and reference
    report = json.loads((out / "ppl.json").read_text())
    runs = {(r["text"], r["method"]): r for r in report["results"]}
    assert set(runs) == {(t, m) for t in ("essays", "kjv") for m in ("full", "streaming", "lacache", "g2")}
    assert runs["kjv", "g2"]["cache"]["group"] == 2 and runs["kjv", "g2"]["cache"]["sinks"] == 2
    assert cli_main(["eval", "ppl", "--texts", "essays,nope"]) == 2
    assert "nope" in capsys.readouterr().err
    assert cli_main(["eval", "ppl", "--variant", "broken"]) == 2
    assert "NAME=METHOD" in capsys.readouterr().err
