"""Decode cost of a left-padded batch (one single-row cache per sequence) vs an unpadded batch.

    python scripts/bench_padded.py --lengths 400,300,200,100 --budget 256 --new 49 --repeats 2

Both batches have the same width (the longest prompt); the unpadded one fills every row with text.
Prints mean ms per decode step and the cache's bytes for each run, alternating the two kinds.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from lacache import LaCache, load_model
from lacache.lab.texts import load_essays


class _Clock(LogitsProcessor):
    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="400,300,200,100")
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--new", type=int, default=49)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    model, tokenizer = load_model()
    text = tokenizer(load_essays(max_chars=40_000), return_tensors="pt")["input_ids"][0]
    width = max(lengths)
    print("| batch | ms/step (mean) | cache bytes |")
    print("|---|---|---|")
    for _ in range(args.repeats):
        for padded in (False, True):
            ids = torch.full((len(lengths), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.ones_like(ids)
            for b, n in enumerate(lengths):
                start = 1000 * b
                if padded:
                    ids[b, width - n:] = text[start:start + n]
                    mask[b, : width - n] = 0
                else:
                    ids[b] = text[start:start + width]
            cache = LaCache.from_model(model, budget=args.budget)
            clock = _Clock()
            with torch.no_grad():
                model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=args.new,
                               min_new_tokens=args.new, do_sample=False, logits_processor=LogitsProcessorList([clock]))
            step = 1000 * torch.tensor(clock.times, dtype=torch.float64).diff().mean().item()
            kind = f"left-padded {args.lengths}" if padded else f"unpadded {len(lengths)}x{width}"
            assert cache.padded == padded
            print(f"| {kind} | {step:.1f} | {cache.memory_bytes():,} |")


if __name__ == "__main__":
    main()
