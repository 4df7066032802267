"""PNG plots of the benchmarks' rows (matplotlib, headless).

Kept apart from the measurements so that running a benchmark never needs matplotlib until a plot
is asked for (it is imported on first use, with the non-interactive Agg backend).
"""

from __future__ import annotations

from collections.abc import Sequence

from .cache_update import REFERENCE
from .memory import MB

__all__ = ["plot_cache", "plot_decode", "plot_memory", "plot_prefill", "plot_stream"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _by_method(rows: Sequence[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["method"], []).append(r)
    return out


def _save(fig, path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)


def plot_decode(rows: Sequence[dict], path, title: str = "Decode speed") -> None:
    """ms/token vs generated tokens, one line per method."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for method, mine in _by_method(rows).items():
        ax.plot([r["last"] for r in mine], [r["ms_per_token"] for r in mine], marker=".", label=method)
    ax.set_xlabel("generated tokens")
    ax.set_ylabel("ms / token (window mean)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    _save(fig, path)


def plot_memory(rows: Sequence[dict], path, title: str = "Memory while decoding") -> None:
    """Cache MB and process RSS MB vs generated tokens, one line per method."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method, mine in _by_method(rows).items():
        x = [r["last"] for r in mine]
        axes[0].plot(x, [r["cache_bytes"] / MB for r in mine], marker=".", label=method)
        line = axes[1].plot(x, [r["rss_bytes"] / MB for r in mine], marker=".", label=f"{method} RSS")
        axes[1].plot(x, [r["peak_rss_bytes"] / MB for r in mine], ls="--", color=line[0].get_color(), alpha=0.6,
                     label=f"{method} peak")
    axes[0].set_ylabel("KV cache (MB)")
    axes[1].set_ylabel("process RSS (MB)")
    for ax in axes:
        ax.set_xlabel("generated tokens")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylim(bottom=0)
    fig.suptitle(title)
    _save(fig, path)


def plot_stream(result: dict, path, title: str | None = None) -> None:
    """tokens/s, memory (cache, RSS, CUDA) and slots vs tokens of a constant-memory stream."""
    plt = _pyplot()
    samples = result["samples"]
    x = [s["tokens"] for s in samples]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    axes[0].plot(x, [s["tokens_per_s"] for s in samples], marker=".")
    axes[0].set_ylabel("tokens / s (interval)")
    axes[0].set_ylim(bottom=0)
    axes[1].plot(x, [s["cache_bytes"] / MB for s in samples], marker=".", label="cache.memory_bytes()")
    axes[1].plot(x, [s["rss_bytes"] / MB for s in samples], marker=".", label="process RSS")
    if samples[0]["cuda_allocated_bytes"] is not None:
        axes[1].plot(x, [s["cuda_allocated_bytes"] / MB for s in samples], marker=".", label="CUDA allocated")
    axes[1].set_ylabel("MB")
    axes[1].set_yscale("log")
    axes[1].legend(fontsize=8)
    axes[2].plot(x, [s["num_slots"] for s in samples], marker=".")
    axes[2].axhline(result["budget"], ls="--", color="gray", label=f"budget {result['budget']}")
    axes[2].set_ylabel("slots per layer")
    axes[2].set_ylim(bottom=0)
    axes[2].legend(fontsize=8)
    for ax in axes:
        ax.set_xlabel("generated tokens")
        ax.grid(alpha=0.3)
    verdict = result["verdict"]
    ratio = verdict.get("cache_bytes_ratio")
    rss = verdict.get("rss_bytes_ratio")
    fig.suptitle(title or (
        f"{result['method']} stream, budget {result['budget']}, {result['tokens']:,} tokens: memory "
        f"{'flat' if verdict['flat'] else 'NOT flat'} (cache x{ratio if ratio is None else round(ratio, 4)}, "
        f"RSS x{rss if rss is None else round(rss, 4)} vs after the first compaction)"
    ))
    _save(fig, path)


def plot_cache(rows: Sequence[dict], path, title: str = "Time inside cache.update per token (all layers)") -> None:
    """ms/token vs budget, one line per method (and positions mode) per layer count."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["positions"], r["layers"]), []).append(r)
    styles = ["-", "--", ":", "-."]
    layer_counts = sorted({r["layers"] for r in rows})
    colors = list(dict.fromkeys((method, mode) for method, mode, _ in groups))  # one colour per method/mode
    for (method, mode, num_layers), mine in groups.items():
        mine = sorted(mine, key=lambda r: r["budget"])
        label = f"{method} ({mode}), {num_layers} layers" if method != REFERENCE else f"{method}, {num_layers} layers"
        ax.plot([r["budget"] for r in mine], [r["ms_per_token"] for r in mine], marker="o",
                color=f"C{colors.index((method, mode)) % 10}",
                ls=styles[layer_counts.index(num_layers) % len(styles)], label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("budget (slots per layer)")
    ax.set_ylabel("ms / token in cache.update (all layers)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    ax.set_title(title)
    _save(fig, path)


def plot_prefill(result: dict, path, title: str | None = None, full: dict | None = None) -> None:
    """Chunk tokens/s and memory vs prompt tokens, with the computed size of a full cache."""
    plt = _pyplot()
    s, rows = result["summary"], result["rows"]
    x = [r["tokens"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    axes[0].plot(x, [r["chunk_tokens_per_s"] for r in rows], marker=".", label=f"{s['method']} (per chunk)")
    if full is not None:
        axes[0].plot([r["tokens"] for r in full["rows"]], [r["chunk_tokens_per_s"] for r in full["rows"]],
                     marker=".", label="full (per chunk)")
    axes[0].set_ylabel("prefill tokens / s")
    axes[0].set_ylim(bottom=0)
    per_token = s["full_cache_bytes"] / s["tokens"]
    axes[1].plot(x, [r["cache_bytes"] / MB for r in rows], marker=".", label=f"{s['method']} cache")
    axes[1].plot(x, [r["rss_bytes"] / MB for r in rows], marker=".", label=f"process RSS ({s['method']})")
    axes[1].plot(x, [per_token * t / MB for t in x], ls="--", label="full cache KV (computed)")
    if full is not None:
        fx = [r["tokens"] for r in full["rows"]]
        axes[1].plot(fx, [r["cache_bytes"] / MB for r in full["rows"]], marker=".", label="full cache (measured)")
        axes[1].plot(fx, [r["rss_bytes"] / MB for r in full["rows"]], marker=".", label="process RSS (full)")
    axes[1].set_ylabel("MB")
    axes[1].set_yscale("log")
    for ax in axes:
        if s["trained_context"] and s["trained_context"] <= s["tokens"]:
            ax.axvline(s["trained_context"], color="gray", ls=":", label="trained context")
        ax.set_xlabel("prompt tokens")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title or f"Chunked prefill ({s['method']}, budget {s['budget']}, chunk {s['prefill_chunk']}), "
                          f"{s['tokens']:,} tokens")
    _save(fig, path)
