"""How much live attention-score caches slow a plain ``generate()`` of the same model.

Each TOVA/H2O cache needs the queries of its own forwards. This measures, in one run, a plain
greedy ``generate()`` (transformers' own cache) of the bundled model alone and again while
``--caches`` H2O caches built for the same model are alive; the ratio is what those caches cost
forwards that do not use them. Usage: ``python scripts/hook_overhead.py --caches 20 --tokens 40``.
"""

from __future__ import annotations

import argparse
import time

import torch

from lacache import load_model, make_cache


def best_of(runs: int, fn) -> float:
    """The fastest of ``runs`` timings of ``fn()`` in seconds (the least disturbed by other load)."""
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--caches", type=int, default=20, help="live H2O caches while timing the second run")
    parser.add_argument("--tokens", type=int, default=40, help="new tokens per generate()")
    parser.add_argument("--runs", type=int, default=3, help="timings per case; the fastest is kept")
    args = parser.parse_args()
    model, tokenizer = load_model()
    ids = tokenizer("The history of the lighthouse begins with", return_tensors="pt")["input_ids"]

    def plain() -> None:
        with torch.no_grad():
            model.generate(ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False)

    plain()  # warm-up
    alone = best_of(args.runs, plain)
    caches = [make_cache("h2o", model, budget=64) for _ in range(args.caches)]
    loaded = best_of(args.runs, plain)
    print(f"plain generate(), {args.tokens} tokens: {alone:.3f} s alone, {loaded:.3f} s with {len(caches)} live "
          f"H2O caches: ratio {loaded / alone:.2f}")


if __name__ == "__main__":
    main()
