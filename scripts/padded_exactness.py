"""A left-padded batch on the default model: each row vs the same prompt alone, exact and naive.

    python scripts/padded_exactness.py

Two essay prompts (120 and 60 tokens) in one left-padded batch, LaCache budget 64, 30 greedy new
tokens. "exact" is lacache as shipped (one single-row cache per sequence); "naive" hides the padding
from the cache (the hook never sees it), i.e. compacts the padded layout as one block. Prints, per
row, the worst |logit difference| to the row alone and whether the generated tokens are the same.
"""

from __future__ import annotations

import torch

from lacache import LaCache, load_model
from lacache.lab.texts import load_essays


def main() -> None:
    model, tokenizer = load_model()
    text = tokenizer(load_essays(max_chars=8000), return_tensors="pt")["input_ids"][0]
    prompts = [text[:120], text[500:560]]
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for b, prompt in enumerate(prompts):
        ids[b, width - len(prompt):] = prompt
        mask[b, width - len(prompt):] = 1
    kwargs = dict(max_new_tokens=30, min_new_tokens=30, do_sample=False, output_logits=True,
                  return_dict_in_generate=True)
    for kind in ("exact", "naive"):
        cache = LaCache.from_model(model, budget=64)
        if kind == "naive":
            cache._begin_padded_forward = lambda mask, q: None
        out = model.generate(ids, attention_mask=mask, cache=cache, **kwargs)
        for b, prompt in enumerate(prompts):
            alone = model.generate(prompt[None], cache=LaCache.from_model(model, budget=64), **kwargs)
            worst = max((got[b] - want[0]).abs().max().item() for got, want in zip(out.logits, alone.logits))
            same = torch.equal(out.sequences[b, width:], alone.sequences[0, len(prompt):])
            print(f"{kind}: row {b} ({len(prompt)} tokens): worst |logit diff| {worst:.2e}, same tokens: {same}")


if __name__ == "__main__":
    main()
