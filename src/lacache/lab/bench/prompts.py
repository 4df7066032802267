"""The prompts the benchmarks feed a model: real text when there is a tokenizer, random ids otherwise.

Timings and memory depend on the number of tokens, not on what they say, but a real model reading
random ids can behave oddly (early end-of-sequence, degenerate attention), so the bundled essays are
used whenever a tokenizer exists; the random tiny model (no tokenizer) gets seeded random ids.
"""

from __future__ import annotations

import math

import torch

__all__ = ["prompt_ids"]


def prompt_ids(model, tokenizer, n: int, seed: int, random_ids: bool = False) -> torch.Tensor:
    """``(1, n)`` prompt ids: the bundled essays (repeated as needed), or random ids (no tokenizer, or
    ``random_ids``) drawn with ``seed`` from the model's vocabulary."""
    if tokenizer is not None and not random_ids:
        from ..texts import ESSAY_SEPARATOR, load_essays

        chars = 8 * n + 64
        while True:
            text = load_essays(max_chars=chars)
            ids = tokenizer(text, return_tensors="pt", verbose=False)["input_ids"][0]
            if ids.numel() >= n or len(text) < chars:
                break
            chars *= 2
        if ids.numel() < n:  # the whole collection is shorter than asked: repeat it
            sep = tokenizer(ESSAY_SEPARATOR, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
            piece = torch.cat([ids, sep])
            ids = piece.repeat(math.ceil(n / piece.numel()))
        return ids[:n][None]
    vocab = int(model.config.vocab_size)
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (1, n), generator=generator)
