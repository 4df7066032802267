"""See what a cache keeps: which original tokens every layer holds, and in what role.

A bounded cache's defining picture is a layers x token-positions map: LaCache's ladder shows as
staggered stripes (each layer keeps different old tokens, together they still cover a long span),
StreamingLLM as two bands (sinks and the recent window, the same in every layer), score methods as
scattered dots. :func:`retention` reads that map from a live cache (any method, a padded batch's
row, or transformers' full cache); :func:`watch` runs a prompt and a greedy continuation and takes
maps at chosen decode steps; :func:`draw` renders maps side by side (PNG, SVG). ``lacache inspect``
is the command-line front end.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..cache import BoundedCache
from ..registry import unbounded_method

__all__ = ["ROLES", "COLOURS", "RetentionMap", "retention", "watch", "draw"]

#: what a cell of the map means, by code: a token a layer no longer holds, or the role of its slot
ROLES = ("evicted", "kept", "sink", "window", "salient")
#: one colour per role, chosen to stay distinct for colour-blind readers (Okabe-Ito) on white
COLOURS = ("#f2f2f2", "#0072b2", "#d55e00", "#009e73", "#cc79a7")
_CODE = {role: code for code, role in enumerate(ROLES)}


@dataclass
class RetentionMap:
    """Which of ``seen`` tokens each layer holds: ``codes[layer, position]`` indexes :data:`ROLES`."""

    method: str
    step: int  # decode steps after the prompt when the map was taken (0: right after it)
    codes: np.ndarray  # [layers, seen] int8

    @property
    def layers(self) -> int:
        return int(self.codes.shape[0])

    @property
    def seen(self) -> int:
        return int(self.codes.shape[1])

    def slots(self) -> list[int]:
        """Tokens held per layer."""
        return [int(n) for n in (self.codes != 0).sum(axis=1)]

    def coverage(self) -> float:
        """Share of the tokens seen that at least one layer still holds (the span the cache covers)."""
        return float((self.codes != 0).any(axis=0).mean()) if self.seen else 0.0

    def layer_coverage(self) -> float:
        """Share of the tokens seen held by an average layer."""
        return float((self.codes != 0).mean()) if self.seen else 0.0

    def label(self) -> str:
        """One line for a figure: slots per layer, tokens seen, coverage."""
        slots = self.slots()
        return f"{max(slots) if slots else 0} slots/layer of {self.seen} seen, covers {self.coverage():.0%}"

    def summary(self) -> dict:
        slots = self.slots()
        return {"method": self.method, "step": self.step, "seen": self.seen, "layers": self.layers,
                "slots_per_layer": max(slots) if slots else 0, "coverage": round(self.coverage(), 4),
                "layer_coverage": round(self.layer_coverage(), 4)}

    def to_dict(self) -> dict:
        """The map as JSON-friendly data: one string of role codes (digits) per layer."""
        return {**self.summary(), "roles": list(ROLES),
                "codes": ["".join(map(str, row.tolist())) for row in self.codes]}


def retention(cache, batch_index: int = 0, method: str | None = None, step: int = 0) -> RetentionMap:
    """The retention map of ``cache`` (sequence ``batch_index``) as it stands now.

    A bounded cache reports each slot's original token (``token_positions``) and its policy the slot's
    role (``RetentionPolicy.slot_roles``); a left-padded batch reports the row's own tokens; any other
    transformers cache (the full cache) holds every token it has seen.
    """
    if not isinstance(cache, BoundedCache):
        seen = int(cache.get_seq_length())
        layers = len(getattr(cache, "layers", [])) or 1
        return RetentionMap(method or unbounded_method(), step, np.full((layers, seen), _CODE["kept"], dtype=np.int8))
    name = method or type(cache).__name__
    if cache.padded:
        if not 0 <= batch_index < cache.batch_size:
            raise IndexError(f"batch_index={batch_index} is out of range for a batch of {cache.batch_size}")
        return retention(cache._rows[batch_index], 0, name, step)
    layers = len(cache.layers)
    codes = np.zeros((layers, cache.seen), dtype=np.int8)
    for layer in range(layers):
        positions = cache.token_positions(layer, batch_index).numpy()
        roles = cache.policy.slot_roles(layer, len(positions), batch_index)
        codes[layer, positions] = [_CODE[role] for role in roles]
    return RetentionMap(name, step, codes)


def watch(model, ids: torch.Tensor, method: str, budget: int | None, steps: Sequence[int],
          options: dict | None = None) -> list[RetentionMap]:
    """Feed ``ids`` ([1, n]) to a fresh cache of ``method``, decode greedily, and take a map after
    ``s`` decode steps for each ``s`` in ``steps`` (0: right after the prompt).

    The prompt is fed in one forward, as ``generate()`` does (attention-score methods observe while
    prefilling); decode steps give positions by slot (``lacache.cache.generation``), so a long watch never
    passes the model's trained context.
    """
    from ..cache.generation import next_positions
    from ..registry import make_cache

    if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] < 1:
        raise ValueError(f"ids must be one prompt of at least one token ([1, n]); got shape {tuple(ids.shape)}")
    wanted = sorted(set(int(s) for s in steps))
    if not wanted or wanted[0] < 0:
        raise ValueError(f"steps={list(steps)} must be decode steps >= 0, e.g. steps=[0, 500]")
    cache = make_cache(method, model, budget, **(options or {}))
    device = ids.device
    maps = []
    with torch.no_grad():
        logits = model(input_ids=ids, position_ids=next_positions(cache, ids.shape[1], device), cache=cache).logits
        for step in range(wanted[-1] + 1):
            if step in wanted:
                maps.append(retention(cache, method=method, step=step))
            if step == wanted[-1]:
                break
            token = logits[:, -1].argmax(dim=-1, keepdim=True)
            logits = model(input_ids=token, position_ids=next_positions(cache, 1, device), cache=cache).logits
    return maps


#: tokens shown in a zoomed panel: a few ladder periods, each token a square a reader can count
ZOOM_TOKENS = 48


def zoom_window(codes: np.ndarray, width: int = ZOOM_TOKENS) -> tuple[int, int] | None:
    """``[start, end)`` of the ``width`` tokens where the layers differ most (the ladder's stagger), or None
    when every layer holds the same tokens everywhere (StreamingLLM, a full cache): nothing to zoom on."""
    held = codes != 0
    mixed = held.any(axis=0) & ~held.all(axis=0)  # tokens some layers hold and others do not
    if not mixed.any():
        return None
    width = min(width, codes.shape[1])
    counts = np.convolve(mixed.astype(np.int32), np.ones(width, dtype=np.int32), mode="valid")
    start = int(np.argmax(counts))
    return start, start + width


def draw(maps: Sequence[RetentionMap], paths: Sequence[str | Path], title: str | None = None) -> list[str]:
    """Draw ``maps`` as a grid (one row per method, one column per step) and save it to each of ``paths``.

    Under every map whose layers hold different tokens, a zoomed panel shows :data:`ZOOM_TOKENS` tokens
    of the history as one square per (layer, token), where the per-layer stagger is plain to see (at
    hundreds of tokens per panel it would read as hatching); the zoomed span is outlined on the map.
    The legend lists only the roles the maps show (returned), and a footnote says what "covers" measures.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.patches import Patch, Rectangle

    methods = list(dict.fromkeys(m.method for m in maps))
    steps = sorted({m.step for m in maps})
    by_key = {(m.method, m.step): m for m in maps}
    zooms = {key: zoom_window(m.codes) for key, m in by_key.items()}
    zoomed = [any(zooms.get((method, step)) for step in steps) for method in methods]
    rows = [(method, False) for method in methods]
    for method, has_zoom in zip(methods, zoomed):
        if has_zoom:
            rows.insert(rows.index((method, False)) + 1, (method, True))
    heights = [1.0 if not zoom else 1.15 for _, zoom in rows]
    fig, axes = plt.subplots(len(rows), len(steps), squeeze=False, gridspec_kw={"height_ratios": heights},
                             figsize=(4.6 * len(steps) + 1.2, 1.95 * len(rows) + 1.3))
    cmap = ListedColormap(COLOURS)
    norm = BoundaryNorm(np.arange(len(ROLES) + 1) - 0.5, len(ROLES))
    for r, (method, zoom) in enumerate(rows):
        for c, step in enumerate(steps):
            ax = axes[r][c]
            found = by_key.get((method, step))
            window = zooms.get((method, step))
            if found is None or (zoom and window is None):
                ax.axis("off")
                continue
            if zoom:
                start, end = window
                part = found.codes[:, start:end]
                ax.pcolormesh(np.arange(start, end + 1) - 0.5, np.arange(found.layers + 1) - 0.5, part, cmap=cmap,
                              norm=norm, edgecolors="white", linewidth=0.4)
                ax.invert_yaxis()
                ax.set_title(f"zoom: tokens {start}-{end - 1}, one square per layer and token", fontsize=8)
            else:
                ax.imshow(found.codes, aspect="auto", interpolation="nearest", cmap=cmap, norm=norm,
                          extent=(-0.5, found.seen - 0.5, found.layers - 0.5, -0.5))
                ax.set_title(f"{method}, step {step}: {found.label()}", fontsize=8)
                if window is not None:
                    ax.add_patch(Rectangle((window[0] - 0.5, -0.5), window[1] - window[0], found.layers,
                                           fill=False, edgecolor="black", linewidth=0.9))
            if c == 0:
                ax.set_ylabel("layer", fontsize=8)
            if r == len(rows) - 1 or (zoom and r == len(rows) - 1):
                ax.set_xlabel("token position", fontsize=8)
            ax.tick_params(labelsize=7)
    present = sorted({int(code) for m in maps for code in np.unique(m.codes)})
    handles = [Patch(facecolor=COLOURS[code], edgecolor="#999999", label=ROLES[code]) for code in present]
    fig.legend(handles=handles, loc="lower center", ncol=max(1, len(handles)), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, 0.035))
    note = ("covers: share of the tokens seen that at least one layer still holds (a layer alone holds fewer; "
            "the ladder staggers which ones, so together the layers span the history)")
    fig.text(0.5, 0.005, "\n".join(textwrap.wrap(note, int(fig.get_figwidth() * 15))), ha="center", va="bottom",
             fontsize=7, color="#444444")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.09, 1, 0.95 if title else 1))
    for path in paths:
        fig.savefig(path, dpi=130)
    plt.close(fig)
    return [ROLES[code] for code in present]
