"""``lacache report``: the run record every result carries, the HTML page, and docs/results.md's generated tables."""

import json
import re
import shutil
from pathlib import Path

import pytest

from lacache.cli import main as cli_main
from lacache.lab.report.discover import discover
from lacache.lab.report.markdown import REGION, markdown_table, regenerate_markdown
from lacache.lab.report.records import PplRecord, ppl_from_csv, ppl_from_payload
from lacache.lab.report.tables import Cell, Table, ppl_table
from lacache.lab.runinfo import command_context, run_record, with_run_record
from report_runs import OLD_PROBLEMS, make_runs, tiny_model_dir

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    return make_runs(root / "runs", tiny_model_dir(root / "model"))


@pytest.fixture(scope="module")
def page(runs):
    out = runs.parent / "site" / "report.html"
    assert cli_main(["report", str(runs), "-o", str(out)]) == 0
    return out, out.read_text(encoding="utf-8")


# --------------------------------------------------------------------------- the run record
def test_every_writer_adds_the_run_record_and_keeps_its_fields(runs):
    ppl = json.loads((runs / "ppl" / "ppl.json").read_text())
    assert {"model", "trained_context", "tokens", "text", "results"} <= set(ppl)  # unchanged fields
    run = ppl["run"]
    assert run["command"][:3] == ["lacache", "eval", "ppl"] and "--tokens" in run["command"]
    assert run["options"]["dtype"] == "float32" and run["options"]["tokens"] == 100  # defaults included
    assert run["torch"] and run["transformers"] and run["lacache"] and run["python"] and run["time"]
    for path, head in (("passkey/passkey.json", ["lacache", "eval", "passkey"]),
                       ("ruler/ruler.json", ["lacache", "eval", "ruler"]),
                       ("bench/decode.json", ["lacache", "bench", "decode"]),
                       ("bench/memory.json", ["lacache", "bench", "decode"]),
                       ("bench/cache.json", ["lacache", "bench", "cache"])):
        payload = json.loads((runs / path).read_text())
        assert payload["run"]["command"][:3] == head, path
    assert "environment" in json.loads((runs / "bench" / "cache.json").read_text())  # the benchmarks' own block stays


def test_every_result_says_its_kind_and_schema_first(runs):
    from lacache.lab.results import KINDS, SCHEMA

    for path, kind in (("ppl/ppl.json", "eval.ppl"), ("passkey/passkey.json", "eval.passkey"),
                       ("ruler/ruler.json", "eval.ruler"), ("bench/decode.json", "bench.decode"),
                       ("bench/memory.json", "bench.memory"), ("bench/cache.json", "bench.cache")):
        payload = json.loads((runs / path).read_text())
        assert list(payload)[:2] == ["kind", "schema"], path
        assert payload["kind"] == kind and payload["schema"] == SCHEMA == 1 and kind in KINDS, path


def test_the_environment_block_comes_from_the_run_record_module(runs):
    from lacache.lab.runinfo import environment

    block = json.loads((runs / "bench" / "cache.json").read_text())["environment"]
    assert set(block) == set(environment("cpu")) and block["device"] == "cpu"


def test_discovery_reads_the_declared_kind_and_falls_back_for_older_files(runs, tmp_path):
    folder = tmp_path / "renamed"
    folder.mkdir()
    ppl = json.loads((runs / "ppl" / "ppl.json").read_text())
    (folder / "my run.json").write_text(json.dumps(ppl))  # any name: the kind says what it is
    (folder / "later.json").write_text(json.dumps({**ppl, "schema": 2}))
    (folder / "other.json").write_text(json.dumps({"kind": "eval.future", "schema": 1}))
    memory = json.loads((runs / "bench" / "memory.json").read_text())
    (folder / "decode.json").write_text(json.dumps(memory))  # a memory result under decode's name: still memory
    found = discover([folder])
    kinds = {r.path.name: r.kind for r in found.results}
    assert kinds == {"my run.json": "ppl", "decode.json": "memory"}
    problems = {r.path.name: r.problem for r in found.unrecognised}
    assert "newer than this lacache reads" in problems["later.json"]
    assert "'eval.future' is not one this lacache reads" in problems["other.json"]
    # the fallback, for files without a kind: the old ppl.json is still read as a ppl result
    assert "kind" not in json.loads((runs / "old" / "ppl.json").read_text())
    assert [r.kind for r in discover([runs / "old"]).results] == ["ppl"]


def test_run_record_outside_a_command_and_payloads_it_leaves_alone():
    assert run_record()["command"] is None  # a library call has no command to name
    with command_context(["bench", "cache"], {"dtype": "float32", "device": object()}):
        record = run_record()
    assert record["command"] == ["lacache", "bench", "cache"] and record["options"] == {"dtype": "float32"}
    assert with_run_record([1, 2]) == [1, 2]
    kept = {"run": {"command": ["earlier"]}}
    assert with_run_record(kept) is kept  # a re-written payload keeps the record of the run that measured it


# --------------------------------------------------------------------------- the page
def test_page_collects_every_result_with_command_environment_links_and_figures(page, runs):
    out, text = page
    for section in ("ppl", "passkey", "ruler", "decode", "memory", "cache", "inspect", "unrecognised"):
        assert f'<section id="{section}">' in text, section
    assert "lacache eval ppl --model" in text and "lacache bench cache --budgets 48" in text  # exact commands
    assert "transformers" in text and "float32" in text
    # relative links that resolve to the files each run wrote
    hrefs = re.findall(r'<a href="([^"#]+)"', text)
    assert "../runs/ppl/ppl.csv" in hrefs and "../runs/bench/decode.json" in hrefs
    assert all((out.parent / h).is_file() for h in hrefs)
    # figures: the runs' PNGs embedded, the inspector's figure once (it wrote it as PNG and SVG), the old
    # ppl run's curves drawn
    assert text.count("data:image/png;base64,") >= 6
    assert text.count('alt="inspect.png"') == 1 and 'alt="inspect.svg"' not in text
    assert '<svg class="curves"' in text
    assert "budget</dt><dd>64" in text and "steps</dt><dd>0, 100" in text  # the inspector's fields
    assert 'class="num best"' in text  # best values marked


def test_page_is_self_contained(page):
    _, text = page
    assert not re.search(r"https?://", text)
    assert "<link" not in text and "<script src" not in text and "@import" not in text


def test_older_and_foreign_files_are_listed_not_fatal(page):
    _, text = page
    problems = text.split('<section id="unrecognised">', 1)[1]
    for name in OLD_PROBLEMS:
        assert f"old/{name}" in problems, name
    assert "older run / not recognised" in problems and "could not be read as JSON" in problems
    assert "old/notes.json</code>: not a lacache result" in problems
    assert "older run: no run record" in text  # the old ppl.json is still shown, with its numbers


def test_empty_or_foreign_folders_are_one_clear_error(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli_main(["report", str(empty), "-o", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lacache: error: no lacache results") and "they are empty" in err and err.count("\n") == 1
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text("{}")
    (foreign / "notes.txt").write_text("x")
    assert cli_main(["report", str(foreign), "-o", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    assert "found 2 file(s)" in err and "config.json" in err and "notes.txt" in err
    assert not (tmp_path / "r.html").exists()
    assert cli_main(["report", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli_main(["report"]) == 2
    assert "give run folders" in capsys.readouterr().err


def test_only_old_results_still_make_a_page(runs, tmp_path):
    found = discover([runs / "old"])
    assert [r.kind for r in found.results] == ["ppl"] and len(found.unrecognised) == 3
    assert cli_main(["report", str(runs / "old"), "-o", str(tmp_path / "old.html")]) == 0


# --------------------------------------------------------------------------- records and tables
def test_ppl_csv_and_json_give_the_same_results(runs):
    from_json = ppl_from_payload(json.loads((runs / "ppl" / "ppl.json").read_text()))
    from_csv = ppl_from_csv(runs / "ppl" / "ppl.csv")
    assert [(r.method, r.budget, r.windows) for r in from_csv] == [(r.method, r.budget, r.windows) for r in from_json]
    assert [r.ppl for r in from_csv] == pytest.approx([r.ppl for r in from_json], rel=1e-12)


def test_ppl_csv_without_overall_rows_combines_the_windows(tmp_path):
    path = tmp_path / "ppl.csv"
    path.write_text("method,budget,step,first,last,ppl\nfull,,1,1,3,2.0\nfull,,1,3,5,8.0\n")
    (record,) = ppl_from_csv(path)
    assert record.ppl == pytest.approx(4.0) and len(record.windows) == 2  # exp of the token-weighted mean NLL


def test_best_is_per_column_within_groups_and_skips_reference_rows():
    records = [PplRecord("full", None, 4.0, "a"), PplRecord("streaming", 8, 6.0, "a"), PplRecord("lacache", 8, 5.0, "a"),
               PplRecord("streaming", 8, 9.0, "b"), PplRecord("lacache", 8, 9.5, "b")]
    table = ppl_table(records)
    assert table.headers == ["text", "method", "budget 8"] and table.best() == {(0, 2), (3, 2)}
    assert table.best(exclude=["full"]) == {(2, 2), (3, 2)}
    assert "| a | lacache | **5.00** |" in markdown_table(table, bold_best=True, exclude_best=["full"])
    tie = Table(["method", "x"], [[Cell("a"), Cell("1", 1.0)], [Cell("b"), Cell("1", 1.0)]], better=["higher"])
    assert tie.best() == set()  # all equal: nothing stands out


# --------------------------------------------------------------------------- docs/results.md
@pytest.mark.parametrize("page", ["results.md", "serving.md"])
def test_docs_tables_are_what_their_data_gives(page):
    """Regenerating a page's tables from the CSVs in docs/ changes nothing (else: a table drifted)."""
    text = (DOCS / page).read_text(encoding="utf-8")
    regenerated, count = regenerate_markdown(text, DOCS)
    assert count >= (10 if page == "results.md" else 1)
    assert regenerated == text, f"run: lacache report --markdown docs/{page}"


def test_a_drifted_table_fails_the_check_and_is_rebuilt(tmp_path, capsys):
    shutil.copy(DOCS / "passkey_50_full.csv", tmp_path)
    doc = tmp_path / "doc.md"
    region = '<!-- lacache-table: {"table": "passkey-depth", "data": ["passkey_50_full.csv"]} -->\n\n'
    assert cli_main(["report", "--markdown", str(tmp_path / "none.md")]) == 2
    capsys.readouterr()
    doc.write_text("# Results\n\n" + region + "| stale |\n\n<!-- /lacache-table -->\n\nProse stays.\n")
    assert cli_main(["report", "--markdown", str(doc), "--check"]) == 2
    assert "1 of 1 generated tables differ" in capsys.readouterr().err and "| stale |" in doc.read_text()
    assert cli_main(["report", "--markdown", str(doc)]) == 0
    rebuilt = doc.read_text()
    assert "| streaming | 0/4 | 0/4 | 0/4 | 4/4 | 4/4 | 8/20 |" in rebuilt and rebuilt.endswith("Prose stays.\n")
    assert cli_main(["report", "--markdown", str(doc), "--check"]) == 0
    doc.write_text(region.replace("passkey_50_full", "nowhere") + "<!-- /lacache-table -->\n")
    assert cli_main(["report", "--markdown", str(doc)]) == 2
    assert "'nowhere.csv' not found" in capsys.readouterr().err


def test_region_markers_need_their_closing_marker():
    text = '<!-- lacache-table: {"table": "ruler", "data": ["ruler_50.csv"]} -->\n| x |\n'
    assert not REGION.search(text)
    assert regenerate_markdown(text, DOCS) == (text, 0)
