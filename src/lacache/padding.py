"""Left-padded batches, exactly: each sequence compacts as if it were alone.

A bounded cache evicts different tokens at different times in each sequence of a padded batch:
a row with more padding has seen fewer real tokens and fills its budget later. Compacting the
padded layout as one block is wrong (a ladder applied to pad slots moves real tokens into positions
the mask then hides, and the padding mask transformers builds from the 2D ``attention_mask``
assumes every row still holds its pads at the front). So a bounded cache that sees padding keeps
one single-row cache per sequence, holding only that sequence's real tokens, and hands attention
a *layout*: a left-padded batch of the rows' caches (unused columns, then row ``b``'s held slots),
then this forward's new tokens at columns shared by every row. Causality among the new tokens is
the plain causal mask, and each row's slots end right before its new tokens, as they do alone, so
masks that count columns back from the query (sliding windows) see what they see alone.

transformers derives the padding part of the mask from the 2D ``attention_mask``, which describes
the original padded sequences, not this layout. A forward pre-hook on the decoder replaces it with
the layout's own 2D mask for that forward (``layout_mask``), and the cache reports matching sizes:
``get_mask_sizes(q) = (width + q, 0)`` and ``get_query_offset() = width``.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["first_real", "layout_mask", "watch_padding"]


def first_real(new_valid: Sequence[Sequence[int]], started: Sequence[bool]) -> list[int]:
    """Index of the first real token of this forward's chunk in each row (``q`` if none).

    ``new_valid`` holds the ``attention_mask`` columns of the new tokens; ``started`` says which
    rows already hold real tokens. Only left padding is supported: in each row the padding comes
    before every real token.
    """
    starts = []
    for row, (valid, began) in enumerate(zip(new_valid, started)):
        q = len(valid)
        start = next((i for i, v in enumerate(valid) if v), q)
        if any(not v for v in valid[start:]) or (began and start > 0):
            raise ValueError(
                f"row {row} of the batch has padding after real tokens (attention_mask {list(valid)} in this "
                "forward): bounded caches support left padding only; tokenize with padding_side='left'"
            )
        starts.append(start)
    return starts


def layout_mask(held: Sequence[int], new_mask: torch.Tensor) -> torch.Tensor:
    """The 2D mask of the layout attention sees: ``max(held) - held[b]`` unused columns, row ``b``'s
    ``held[b]`` slots, then the new tokens' own mask columns ``new_mask`` ([B, q])."""
    width = max(held) if held else 0
    device = new_mask.device
    columns = torch.arange(width, device=device)[None, :]
    kept = columns >= width - torch.tensor(list(held), device=device)[:, None]
    return torch.cat([kept, new_mask.to(torch.bool)], dim=1)


def _query_length(args: tuple, kwargs: dict) -> int | None:
    for name in ("input_ids", "inputs_embeds"):
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor):
            return int(value.shape[1])
    if args and isinstance(args[0], torch.Tensor):
        return int(args[0].shape[1])
    return None


def watch_padding(model: nn.Module, cache) -> None:
    """Let ``cache`` see each forward's 2D attention mask and replace it with its layout's mask.

    The hook sits on the decoder (``model.base_model``), which builds the attention masks, so calls
    through the language-model head and direct decoder calls are both seen. It holds the cache
    weakly and is removed when the cache is garbage-collected.
    """
    decoder = getattr(model, "base_model", model)
    ref = weakref.ref(cache)

    def hook(module, args, kwargs):
        owner = ref()
        if owner is None:
            return None
        given = kwargs.get("cache", kwargs.get("past_key_values"))
        if given is not owner:
            return None
        q = _query_length(args, kwargs)
        mask = kwargs.get("attention_mask")
        if q is None:
            return None
        layout = owner._begin_padded_forward(mask, q)
        if layout is None:
            return None
        kwargs = dict(kwargs)
        kwargs["attention_mask"] = layout
        return args, kwargs

    handle = decoder.register_forward_pre_hook(hook, with_kwargs=True)
    weakref.finalize(cache, handle.remove)
