"""``lacache chat``: an interactive multi-turn chat whose whole conversation lives in one bounded cache.

Each user line becomes a chat-template turn fed to a :class:`lacache.lab.chat.ChatSession`, and the
reply is streamed token by token through lacache's own ``stream_tokens``. Commands: ``/stats``,
``/reset`` (a new conversation with a fresh cache), ``/quit`` (or end of input).

Works with stdin on a pipe: ``printf 'Hi!\\n/stats\\n' | lacache chat --max-new-tokens 32``
(or ``python -m lacache.cli chat ...``).
"""

from __future__ import annotations

import argparse
import sys

from ..lab.chat import ChatSession, TurnRecord, eos_ids, stats_line
from ..registry import METHODS, default_method, method_spec
from . import values
from .common import add_dtype_argument, add_model_argument, load_model_for, positive_int

__all__ = ["add_parser", "build_parser", "run_cli"]


#: what an interactive chat holds and answers by default
CHAT_DEFAULTS = {"budget": 512, "max_new_tokens": 256}
#: the demo's: short answers and a small budget, so a few turns (about a minute on a laptop CPU) pass it
DEMO_DEFAULTS = {"budget": 64, "max_new_tokens": 48, "turns": 4}


def _configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add_model_argument(parser)
    parser.add_argument("--method", choices=METHODS, default=default_method())
    parser.add_argument("--budget", type=positive_int, default=None,
                        help=f"cache slots per layer (the whole chat; default {CHAT_DEFAULTS['budget']}, "
                             f"{DEMO_DEFAULTS['budget']} with --demo)")
    parser.add_argument("--sinks", type=int, default=None, help="leading slots never evicted (method default if unset)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=None,
                        help=f"reply length limit per turn (default {CHAT_DEFAULTS['max_new_tokens']}, "
                             f"{DEMO_DEFAULTS['max_new_tokens']} with --demo)")
    parser.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--system", default=None, help="system message (default: the chat template's own)")
    parser.add_argument("--demo", action="store_true",
                        help="ask lacache's shipped questions one after another instead of reading stdin, print the "
                             "memory line after each turn, then the same conversation's memory in a full cache")
    parser.add_argument("--turns", type=int, default=None,
                        help=f"with --demo: turns to run, cycling through the questions (default "
                             f"{DEMO_DEFAULTS['turns']}; 0 = never stop)")
    add_dtype_argument(parser)
    return parser


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``chat`` command to an ``argparse`` sub-parser collection; returns its parser."""
    parser = subparsers.add_parser(
        "chat", help="interactive multi-turn chat; the conversation is held in a fixed-size cache"
    )
    return _configure(parser)


def build_parser() -> argparse.ArgumentParser:
    """A stand-alone parser for the chat's options (what ``lacache chat`` takes)."""
    return _configure(argparse.ArgumentParser(prog="lacache chat", description=__doc__.splitlines()[0]))


def _encoding(stdin) -> str:
    return getattr(stdin, "encoding", None) or "utf-8"


def _read_line(stdin) -> str | None:
    """The next input line; ``""`` at end of input; ``None`` for a line that is not text in stdin's encoding.

    Bytes are read and decoded here, one line at a time, so a line in another encoding (a paste, a
    piped Latin-1 file) is reported and skipped instead of ending the session with a decode error.
    A text stream with no bytes underneath (``io.StringIO``) is read as text.
    """
    raw = getattr(stdin, "buffer", None)
    if raw is None:
        return stdin.readline()
    data = raw.readline()
    try:
        return data.decode(_encoding(stdin))
    except UnicodeDecodeError:
        return None


def run_cli(args, model=None, tokenizer=None) -> list[TurnRecord]:
    """Run the chat loop on ``sys.stdin`` / ``sys.stdout``; return one record per answered turn.

    ``model`` and ``tokenizer`` may be passed in (tests, notebooks) instead of loading ``--model``.
    """
    import torch

    from .. import generation

    values.check_values(args)
    turns = getattr(args, "turns", None)
    is_demo = bool(getattr(args, "demo", False))
    if turns is not None and (turns < 0 or not is_demo):
        raise ValueError(f"--turns {turns} needs --demo and a count >= 0 (0 = never stop), e.g. --demo --turns 64")
    defaults = DEMO_DEFAULTS if is_demo else CHAT_DEFAULTS
    for name in ("budget", "max_new_tokens"):
        if getattr(args, name, None) is None:
            setattr(args, name, defaults[name])
    if is_demo and turns is None:
        turns = DEMO_DEFAULTS["turns"]
    if is_demo:
        print(_demo_banner(args, turns), file=sys.stdout, flush=True)
    if model is None or tokenizer is None:
        model, tokenizer = load_model_for(args)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; lacache chat needs one (use an instruct model)")
    torch.manual_seed(args.seed)
    options = {} if args.sinks is None or not method_spec(args.method).bounded else {"sinks": args.sinks}
    session = ChatSession(model, tokenizer, args.method, args.budget, options, system=args.system)
    eos = eos_ids(model, tokenizer)
    stdin, out = sys.stdin, sys.stdout
    demo = _demo_lines(turns) if getattr(args, "demo", False) else None
    interactive = demo is None and stdin.isatty()
    records: list[TurnRecord] = []
    replies: list[int] = []
    turn_seed = args.seed
    while True:
        if interactive:
            out.write("> ")
            out.flush()
        if demo is not None:
            line = next(demo, "")
            if line:
                out.write(f"> {line}")
                out.flush()
        else:
            line = _read_line(stdin)
        if line is None:
            print(f"[could not decode that line as {_encoding(stdin)}; it was skipped, type it again]", file=out,
                  flush=True)
            continue
        if not line:  # end of input
            break
        text = line.rstrip("\r\n")
        command = text.strip()
        if not command:
            continue
        if command in ("/quit", "/exit"):
            break
        if command == "/stats":
            print(stats_line(session), file=out, flush=True)
            continue
        if command == "/reset":
            session.reset()
            print("[reset] new conversation", file=out, flush=True)
            continue
        if command.startswith("/") and " " not in command:
            print(f"[unknown command {command}; use /stats, /reset or /quit]", file=out, flush=True)
            continue
        ids = session.new_turn_ids(text)
        generated: list[int] = []
        text_out = generation.IncrementalText(tokenizer)
        # looked up on the module at each turn, so a wrapped ``stream_tokens`` (tests) is the one used
        for token_id in generation.stream_tokens(
            model,
            torch.tensor([ids]),
            session.cache,
            args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            eos_token_id=sorted(eos),
            seed=turn_seed,
        ):
            generated.append(token_id)
            if token_id in eos:
                continue
            out.write(text_out.feed(token_id))
            out.flush()
        out.write("\n")
        out.flush()
        turn_seed += 1  # a different sample per turn, reproducible from --seed
        reply = session.add_reply(generated, eos)
        records.append(
            TurnRecord(len(records) + 1, len(ids), len(generated), generation.cache_slots(session.cache),
                       int(getattr(session.cache, "seen", session.cache.get_seq_length())), reply)
        )
        if demo is not None:
            replies += [t for t in generated if t not in eos]
            print(stats_line(session), file=out, flush=True)
    if demo is not None and records:
        print(_demo_summary(records, replies, args), file=out, flush=True)
        print(_full_cache_line(model, tokenizer, session), file=out, flush=True)
    return records


def _demo_banner(args, turns: int) -> str:
    """The demo's first line: what it does, what to watch, how long it takes, and the endless version."""
    from ..lab.bundled import DEFAULT_MODEL_NAME

    what = f"{turns} questions" if turns else "questions without end (Ctrl-C stops)"
    cache = f"one {args.method} cache of {args.budget} slots per layer" if method_spec(args.method).bounded \
        else f"one {args.method} cache"
    length = "about a minute on a laptop CPU, 2-4x that on a busy one" if turns and turns <= 6 else "minutes per turn"
    return (f"[demo] {what} to {args.model or DEFAULT_MODEL_NAME}, in {cache}, answers up to {args.max_new_tokens} tokens "
            f"({length}). Watch the [stats] line after each answer: the cache stops growing once the conversation "
            f"passes the budget; the last line measures the same conversation in a full cache. Endless: "
            f"lacache chat --demo --turns 0 --budget 256 --max-new-tokens 200")


def _full_cache_line(model, tokenizer, session) -> str:
    """The whole conversation run once through transformers' full ``DynamicCache``: its measured size beside
    the bounded cache's (what the same chat would have cost without a bound)."""
    import torch
    from transformers import DynamicCache

    from ..cache.generation import cache_bytes

    text = session._template(session.messages, False)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    device = next(model.parameters()).device
    full = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids.to(device), cache=full, logits_to_keep=1)
    full_bytes, mine = cache_bytes(full), cache_bytes(session.cache)
    ratio = f", {full_bytes / mine:.1f}x this cache's {mine / 2**20:.1f} MiB" if mine else ""
    return (f"[demo] the same conversation ({ids.shape[1]} tokens) in a full DynamicCache, measured: "
            f"{full_bytes / 2**20:.1f} MiB{ratio}; it grows with every turn, this one does not")


def _demo_lines(turns: int | None):
    """The demo's user lines: each shipped question once, ``turns`` of them cycling, or forever (0)."""
    from itertools import cycle, islice

    from ..lab.demo import DEMO_QUESTIONS

    if turns is None:
        turns = len(DEMO_QUESTIONS)
    questions = cycle(DEMO_QUESTIONS) if turns == 0 else islice(cycle(DEMO_QUESTIONS), turns)
    return (question + "\n" for question in questions)


def _demo_summary(records: list[TurnRecord], replies: list[int], args) -> str:
    """The demo's last line: how far past the budget the conversation went, and how repetitive the replies were."""
    from ..lab.demo import repetition_summary

    seen = records[-1].seen
    budget = f" = {seen / args.budget:.1f}x the budget of {args.budget}" if method_spec(args.method).bounded else ""
    return (f"[demo] {args.method}: {len(records)} turns, {seen} tokens seen{budget}; replies: {len(replies)} tokens, "
            f"{repetition_summary(replies)}")
