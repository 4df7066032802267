"""Numbers the README quotes come from the data files in docs/ (or from arithmetic the code does), so they
cannot drift from what was measured. docs/results.md's own tables are regenerated from their CSVs in
tests/test_report.py; the README's numbers are checked against those tables and files here."""

from __future__ import annotations

import csv
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
DOCS = ROOT / "docs"


def _table_row(markdown: str, label: str) -> list[str]:
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0].replace("*", "").replace("`", "").strip() == label:
            return cells
    raise AssertionError(f"no table row {label!r}")


def test_the_salient_pool_pass_key_scores_are_results_md_s():
    found = re.search(r"pass key at half the prompt: (\d+)/20, where the capped ladder scores (\d+)/20 and the "
                      r"default, the authors' schedule, (\d+)/20", README)
    assert found, "the README's salient-pool sentence changed: update this test with it"
    results = (DOCS / "results.md").read_text(encoding="utf-8")
    start = results.index('"table": "passkey-summary"')
    results = results[start:results.index("<!-- /lacache-table -->", start)]  # the summary table, regenerated
    column = 1  # "50%, full prefill"
    for quoted, label in zip(found.groups(), ("lacache-salient", "lacache-capped",
                                              "lacache-reference (= lacache today)")):
        assert _table_row(results, label)[column] == f"{quoted}/20", label


def test_the_vllm_speed_ratio_is_the_capacity_run_s():
    found = re.search(r"serves (\d+\.\d)x faster than the authors' schedule", README)
    assert found
    with open(DOCS / "bench_vllm_capacity.csv") as fh:
        speed = {row["method"]: float(row["tokens_per_s"]) for row in csv.DictReader(fh)}
    assert f"{speed['lacache-capped'] / speed['lacache']:.1f}" == found[1]


def test_the_serving_defaults_numbers_are_their_runs():
    """The README's keydiff sentence: pass keys through vLLM at half and a quarter of the prompt (keydiff's and
    lacache-capped's runs) and keydiff's throughput beside lacache-capped in one capacity run."""
    found = re.search(r"finds (\d+)/20 pass keys at half and (\d+)/20 at a quarter\s+of the prompt, where the "
                      r"capped ladder finds (\d+)/20 and (\d+)/20, at (\d\.\d+) of its throughput", README)
    assert found, "the README's serving-default sentence changed: update this test with it"

    def correct(name: str, method: str) -> int:
        with open(DOCS / name) as fh:
            return sum(row["correct"] == "True" for row in csv.DictReader(fh) if row["method"] == method)

    assert [int(g) for g in found.groups()[:4]] == [
        correct("passkey_50_chunked_keydiff_vllm.csv", "keydiff"), correct("passkey_25_chunked_keydiff_vllm.csv", "keydiff"),
        correct("passkey_50_chunked_vllm.csv", "lacache-capped"), correct("passkey_25_chunked_vllm.csv", "lacache-capped")]
    with open(DOCS / "bench_vllm_capacity_keydiff.csv") as fh:
        speed = {row["method"]: float(row["tokens_per_s"]) for row in csv.DictReader(fh)}
    assert f"{speed['keydiff'] / speed['lacache-capped']:.2f}" == found[5]


def test_the_demo_numbers_are_the_recorded_demo_run_s():
    paragraph = README[README.index("`make demo` prints one line"):README.index("`TORCH_SPEC=...`")]
    run = (DOCS / "demo.txt").read_text(encoding="utf-8")
    stays = re.search(r"the cache stays at ([\d.]+) MiB\s+while the conversation grows to (\d+) tokens \(([\d.]+)x",
                      paragraph)
    full = re.search(r"measures it: ([\d.]+) MiB, ([\d.]+)x", paragraph)
    assert stays and full, paragraph
    last_stats = [line for line in run.splitlines() if line.startswith("[stats]")][-1]
    assert f"cache {stays[1]} MiB" in last_stats and f"| {stays[2]} tokens seen |" in last_stats
    assert f"= {stays[3]}x the budget" in run
    assert f"measured: {full[1]} MiB, {full[2]}x" in run


def test_the_memory_formula_example_is_what_kv_bytes_gives():
    from lacache.lab.bench import kv_bytes

    found = re.search(r"SmolLM2, float32, budget 256: ([\d.]+) MiB", README)
    assert found
    assert f"{kv_bytes(30, 3, 64, 4, 256 + 64) / 2**20:.2f}" == found[1]
