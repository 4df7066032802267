"""Figures for the report page: a run's own image files embedded, or small inline SVG drawn from data.

The page has to open anywhere, offline and as one file, so every image is inside it: the PNG/SVG
files a run wrote become ``data:`` URIs, and when a run has no figure (an older run, or a copied
JSON) the pass-key heatmap and the perplexity curves are drawn here as inline SVG from the
numbers themselves. The SVG is plain markup (no scripts, no external references), written for
HTML, where it needs no namespace declaration.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from pathlib import Path

from .records import PasskeyRecord, PplRecord

__all__ = ["data_uri", "figure_files", "group_by_text", "passkey_heatmap_svg", "ppl_curves_svg"]

_TYPES = {".png": "image/png", ".svg": "image/svg+xml", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
          ".gif": "image/gif", ".webp": "image/webp"}
#: line colours, one per method (colour-blind-safe palette)
_COLOURS = ("#0072b2", "#d55e00", "#009e73", "#cc79a7", "#e69f00", "#56b4e9", "#f0e442", "#000000")


def data_uri(path: Path) -> str | None:
    """The image file ``path`` as a ``data:`` URI, or ``None`` when it is not an image type the page shows."""
    kind = _TYPES.get(path.suffix.lower())
    if kind is None:
        return None
    return f"data:{kind};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _esc(text) -> str:
    return html.escape(str(text), quote=True)


def _accuracy_colour(share: float) -> str:
    """Red (0) through yellow to green (1)."""
    share = min(max(share, 0.0), 1.0)
    red = 215 if share < 0.5 else round(215 - (share - 0.5) * 2 * 175)
    green = round(60 + share * 2 * 120) if share < 0.5 else 180
    return f"rgb({red},{green},70)"


def passkey_heatmap_svg(records: Sequence[PasskeyRecord], method: str) -> str:
    """Pass-key accuracy of ``method``, needle depth (rows) x prompt length (columns), as inline SVG."""
    mine = [r for r in records if r.method == method]
    depths, lengths = sorted({r.depth for r in mine}), sorted({r.length for r in mine})
    cell_w, cell_h, left, top = 64, 26, 70, 40
    width, height = left + cell_w * len(lengths) + 10, top + cell_h * len(depths) + 30
    parts = [f'<svg class="heatmap" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="pass key accuracy, {_esc(method)}">',
             f'<text x="{left}" y="16" font-weight="bold">{_esc(method)}</text>']
    for j, length in enumerate(lengths):
        parts.append(f'<text x="{left + j * cell_w + cell_w / 2}" y="{top - 6}" text-anchor="middle">{length}</text>')
    for i, depth in enumerate(depths):
        y = top + i * cell_h
        parts.append(f'<text x="{left - 6}" y="{y + cell_h / 2 + 4}" text-anchor="end">{round(depth * 100)}%</text>')
        for j, length in enumerate(lengths):
            hit = [r.correct for r in mine if r.depth == depth and r.length == length]
            x = left + j * cell_w
            if not hit:
                parts.append(f'<rect x="{x}" y="{y}" width="{cell_w - 2}" height="{cell_h - 2}" fill="#eee"/>')
                continue
            share = sum(hit) / len(hit)
            parts.append(f'<rect x="{x}" y="{y}" width="{cell_w - 2}" height="{cell_h - 2}" '
                         f'fill="{_accuracy_colour(share)}"><title>{sum(hit)}/{len(hit)}</title></rect>')
            parts.append(f'<text x="{x + cell_w / 2 - 1}" y="{y + cell_h / 2 + 4}" text-anchor="middle">'
                         f'{sum(hit)}/{len(hit)}</text>')
    parts.append(f'<text x="{left + cell_w * len(lengths) / 2}" y="{height - 8}" text-anchor="middle">'
                 f'prompt tokens (rows: needle depth)</text></svg>')
    return "".join(parts)


def _ticks(low: float, high: float) -> list[float]:
    return [low + (high - low) * k / 4 for k in range(5)]


def ppl_curves_svg(records: Sequence[PplRecord], title: str) -> str:
    """Perplexity per window over the token position, one line per result, as inline SVG."""
    series = [(f"{r.method}" + (f" @{r.budget}" if r.budget is not None else ""), r.windows)
              for r in records if r.windows]
    width, height, left, right, top, bottom = 560, 300, 56, 150, 28, 40
    points = [(((a + b) / 2), p) for _, windows in series for a, b, p in windows]
    if not points:
        return ""
    xs, ys = [x for x, _ in points], [y for _, y in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1

    def at(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (width - left - right),
                height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom))

    parts = [f'<svg class="curves" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="{_esc(title)}">', f'<text x="{left}" y="16" font-weight="bold">{_esc(title)}</text>',
             f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="#888"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="#888"/>']
    for y in _ticks(y0, y1):
        _, py = at(x0, y)
        parts.append(f'<text x="{left - 4}" y="{py + 4:.1f}" text-anchor="end">{y:.1f}</text>')
    for x in _ticks(x0, x1):
        px, _ = at(x, y0)
        parts.append(f'<text x="{px:.1f}" y="{height - bottom + 16}" text-anchor="middle">{x:,.0f}</text>')
    parts.append(f'<text x="{(left + width - right) / 2}" y="{height - 6}" text-anchor="middle">token position</text>')
    for k, (name, windows) in enumerate(series):
        colour = _COLOURS[k % len(_COLOURS)]
        path = " ".join(f"{px:.1f},{py:.1f}" for px, py in (at((a + b) / 2, p) for a, b, p in windows))
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{path}"/>')
        parts.append(f'<text x="{width - right + 8}" y="{top + 14 * k + 10}" style="fill: {colour}">{_esc(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def figure_files(folder: Path, names: Sequence[str]) -> list[Path]:
    """The image files among ``names`` (relative to ``folder``) that exist, in order."""
    return [folder / n for n in names if (folder / n).is_file() and (folder / n).suffix.lower() in _TYPES]


def group_by_text(records: Sequence[PplRecord]) -> Mapping[tuple[str, int | None], list[PplRecord]]:
    """Records per (text, budget) panel: the full cache (budget None) is drawn in every budget's panel."""
    budgets = sorted({r.budget for r in records if r.budget is not None}) or [None]
    panels: dict[tuple[str, int | None], list[PplRecord]] = {}
    for text in dict.fromkeys(r.text for r in records):
        for budget in budgets:
            panels[(text, budget)] = [r for r in records if r.text == text and r.budget in (budget, None)]
    return panels
