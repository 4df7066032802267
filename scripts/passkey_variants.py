"""Research probe: pass-key accuracy of named cache variants, one line per variant and depth.

Each variant is ``name=method[,key=value...]``; the budget (a fraction of the prompt) and the
prompt grid are shared, so the numbers are directly comparable. Used to find what makes a ladder
retrieve (see docs/results.md).

    python scripts/passkey_variants.py --budget 0.5 "ladder=lacache" "w2=lacache,window_frac=0.5"
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from lacache.lab.evaluation.passkey import run_passkey
from lacache.lab.models import load_model


def parse_variant(text: str) -> tuple[str, str, dict]:
    name, _, rest = text.partition("=")
    method, *pairs = rest.split(",")
    options = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        for cast in (int, float):
            try:
                options[key] = cast(value)
                break
            except ValueError:
                continue
        else:
            options[key] = value
    return name, method, options


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("variants", nargs="+")
    ap.add_argument("--lengths", default="600,1100")
    ap.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--prefill", default="full")
    ap.add_argument("--prefill-chunk", type=int, default=64)
    ap.add_argument("--filler", default="grass")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    depths = [float(x) for x in args.depths.split(",")]
    model, tok = load_model(dtype=torch.float32)
    results = {}
    for text in args.variants:
        name, method, options = parse_variant(text)
        per_length = []
        for length in lengths:
            opts = dict(options)
            slots = int(args.budget * length) if args.budget < 1 else int(args.budget)
            for key in [k for k in opts if k.endswith("_frac")]:
                opts[key[: -len("_frac")]] = max(1, int(opts.pop(key) * slots))
            started = time.perf_counter()
            per_length += run_passkey(model, tok, [method], [length], depths, list(range(args.seeds)), args.budget,
                                      filler=args.filler, prefill=args.prefill, prefill_chunk=args.prefill_chunk,
                                      method_options={method: opts})
        by_depth = [sum(t.correct for t in per_length if t.depth == d) for d in depths]
        total = sum(t.correct for t in per_length)
        results[name] = {"variant": text, "by_depth": by_depth, "correct": total, "trials": len(per_length)}
        print(f"{name:24s} {' '.join(f'{c}/{len(per_length) // len(depths)}' for c in by_depth)}  "
              f"{total}/{len(per_length)}  ({time.perf_counter() - started:.0f}s last length)", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
