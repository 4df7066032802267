"""Merge ``lacache eval ppl`` runs into the markdown tables of docs/results.md.

Reads each run's ``ppl.json``, keeps one result per (text, method, budget) — the first seen — and
prints two tables: perplexity, and the share of the StreamingLLM -> full gap each method closes.

    python scripts/ppl_tables.py runs/a/ppl.json runs/b/ppl.json --rename lacache=lacache-capped
"""

from __future__ import annotations

import argparse
import json

from lacache.lab.evaluation.perplexity import gap_closed


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", help="ppl.json files")
    ap.add_argument("--rename", action="append", default=[], metavar="OLD=NEW",
                    help="label a method of these runs by its name today")
    ap.add_argument("--methods", default=None, help="comma-separated methods to show (after renaming)")
    args = ap.parse_args()
    rename = dict(item.split("=", 1) for item in args.rename)
    shown = set(args.methods.split(",")) if args.methods else None
    results: dict[tuple[str, str, int | None], float] = {}
    for path in args.runs:
        for r in json.load(open(path))["results"]:
            key = (r.get("text", ""), rename.get(r["method"], r["method"]), r["budget"])
            if shown is None or key[1] in shown:
                results.setdefault(key, r["ppl"])
    texts = list(dict.fromkeys(k[0] for k in results))
    methods = list(dict.fromkeys(k[1] for k in results))
    budgets = sorted({k[2] for k in results if k[2] is not None})
    head = "| text | method | " + " | ".join(f"budget {b}" for b in budgets) + " |"
    rule = "|---|---|" + "---|" * len(budgets)
    print(head, rule, sep="\n")
    for text in texts:
        for method in methods:
            cells = [results.get((text, method, None if method == "full" else b)) for b in budgets]
            if any(c is not None for c in cells):
                print(f"| {text} | {method} | " + " | ".join("—" if c is None else f"{c:.2f}" for c in cells) + " |")
    print("\nShare of the StreamingLLM -> full gap closed\n")
    print(head.replace("| text | method |", "| text | method |"), rule, sep="\n")
    for text in texts:
        full = results.get((text, "full", None))
        for method in methods:
            if method in ("full", "streaming"):
                continue
            cells = []
            for b in budgets:
                mine, stream = results.get((text, method, b)), results.get((text, "streaming", b))
                share = None if None in (mine, stream, full) else gap_closed(mine, stream, full)
                cells.append("—" if share is None else f"{100 * share:+.0f}%")
            print(f"| {text} | {method} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
