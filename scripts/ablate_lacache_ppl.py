"""Ablation of LaCache's knobs by streaming perplexity on the bundled essays.

Usage: python scripts/ablate_lacache_ppl.py --tokens 4000 --budget 128 --step 8 --out runs/ablation
Each configuration is one LaCache (chunk=0, so every run keeps exactly `budget` slots); the
StreamingLLM run at the same budget is the bar to beat.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from lacache.lab.evaluation.perplexity import streaming_nll
from lacache.lab.evaluation.report import format_table, write_csv, write_json
from lacache.lab.models import load_model
from lacache.lab.texts import load_essays
from lacache.registry import make_cache

# window is a fraction of the budget ("eighth" = budget // 8, the first default; "quarter" = the current one)
CONFIGS = [
    ("streaming", "streaming", {"chunk": 0}),
    ("span 15/0", "lacache", {"chunk": 0, "window": "eighth"}),
    ("span 10/0", "lacache", {"chunk": 0, "span": 10, "overlap": 0, "window": "eighth"}),
    ("span 9/7", "lacache", {"chunk": 0, "span": 9, "overlap": 7, "window": "eighth"}),
    ("span 6/3", "lacache", {"chunk": 0, "span": 6, "overlap": 3, "window": "eighth"}),
    ("span 9/7 band", "lacache", {"chunk": 0, "span": 9, "overlap": 7, "layout": "band", "window": "eighth"}),
    ("span 15/0 band", "lacache", {"chunk": 0, "layout": "band", "window": "eighth"}),
    ("sinks 16", "lacache", {"chunk": 0, "sinks": 16, "window": "eighth"}),
    ("sinks 1", "lacache", {"chunk": 0, "sinks": 1, "window": "eighth"}),
    ("window 1/4", "lacache", {"chunk": 0, "window": "quarter"}),
    ("window 1/2", "lacache", {"chunk": 0, "window": "half"}),
    ("span 9/7 window 1/4", "lacache", {"chunk": 0, "span": 9, "overlap": 7, "window": "quarter"}),
    ("span 9/7 window 1/2", "lacache", {"chunk": 0, "span": 9, "overlap": 7, "window": "half"}),
    ("span 10/0 window 1/4", "lacache", {"chunk": 0, "span": 10, "overlap": 0, "window": "quarter"}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=4000)
    parser.add_argument("--budget", type=int, default=128)
    parser.add_argument("--step", type=int, default=8)
    parser.add_argument("--only", default=None, help="comma-separated config names to run")
    parser.add_argument("--out", default="runs/ablation")
    args = parser.parse_args()
    model, tokenizer = load_model()
    ids = tokenizer(load_essays(), return_tensors="pt")["input_ids"][0, : args.tokens]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, records = [], []
    wanted = set(args.only.split(",")) if args.only else None
    for name, method, options in CONFIGS:
        if wanted and name not in wanted:
            continue
        options = dict(options)
        if options.get("window") == "eighth":
            options["window"] = args.budget // 8
        elif options.get("window") == "quarter":
            options["window"] = args.budget // 4
        elif options.get("window") == "half":
            options["window"] = args.budget // 2
        cache = make_cache(method, model, args.budget, **options)
        started = time.perf_counter()
        nll = streaming_nll(model, ids, cache, step=args.step)
        ppl = float(math.exp(nll.mean()))
        rows.append([name, method, ppl, round(time.perf_counter() - started, 1)])
        records.append({"name": name, "method": method, "options": options, "cache": cache.describe(), "ppl": ppl})
        print(f"{name:24s} {ppl:.3f}", flush=True)
    headers = ["config", "method", f"PPL (budget {args.budget})", "seconds"]
    print(format_table(headers, rows))
    write_csv(out / "ablation.csv", headers, rows)
    write_json(out / "ablation.json", {"tokens": int(ids.numel()), "budget": args.budget, "step": args.step,
                                       "runs": records})


if __name__ == "__main__":
    main()
