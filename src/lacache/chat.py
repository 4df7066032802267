"""``lacache chat``: an interactive multi-turn chat whose whole conversation lives in one bounded cache.

Each user line becomes a chat-template turn; only the tokens of the *new* turn are fed to the cache
(the cache already holds everything before it, compacted to ``--budget`` slots per layer), and the
reply is streamed token by token through lacache's own ``stream_tokens``. Commands: ``/stats``,
``/reset`` (a new conversation with a fresh cache), ``/quit`` (or end of input).

Works with stdin on a pipe: ``printf 'Hi!\\n/stats\\n' | python -m lacache.chat --max-new-tokens 32``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

__all__ = ["ChatSession", "add_parser", "build_parser", "main", "run_cli"]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be a positive integer")
    return value


def _configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from .cli import DTYPES
    from .registry import METHODS

    parser.add_argument("--model", default=None, help="hub id or local path; default: bundled SmolLM2-135M-Instruct")
    parser.add_argument("--method", choices=METHODS, default="lacache")
    parser.add_argument("--budget", type=_positive_int, default=512, help="cache slots per layer (the whole chat)")
    parser.add_argument("--sinks", type=int, default=None, help="leading slots never evicted (method default if unset)")
    parser.add_argument("--max-new-tokens", type=_positive_int, default=256, help="reply length limit per turn")
    parser.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--system", default=None, help="system message (default: the chat template's own)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    return parser


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``chat`` command to an ``argparse`` sub-parser collection; returns its parser."""
    parser = subparsers.add_parser(
        "chat", help="interactive multi-turn chat; the conversation is held in a fixed-size cache"
    )
    return _configure(parser)


def build_parser() -> argparse.ArgumentParser:
    return _configure(argparse.ArgumentParser(prog="lacache chat", description=__doc__.splitlines()[0]))


@dataclass
class TurnRecord:
    turn: int
    fed_tokens: int  # tokens of the new turn given to the cache (its prompt part)
    new_tokens: int
    slots: int  # slots per layer after the turn
    seen: int  # tokens the cache has seen in this conversation
    reply: str


@dataclass
class ChatSession:
    """One conversation: the messages, the cache holding them, and what is still to be fed to it."""

    model: object
    tokenizer: object
    method: str
    budget: int
    options: dict
    system: str | None = None
    messages: list = field(default_factory=list)
    cache: object = None
    #: template text up to and including the last generation prompt (what the cache has seen, minus the reply)
    prompted: str = ""
    #: the last generated token when it was not fed to the cache (``stream_tokens`` yields it last)
    unfed: int | None = None

    def __post_init__(self):
        self.reset()

    def reset(self) -> None:
        from .registry import make_cache

        close = getattr(self.cache, "close", None)
        if callable(close):
            close()  # score-based caches remove their attention hooks
        self.cache = make_cache(self.method, self.model, self.budget, **self.options)
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.prompted = ""
        self.unfed = None

    def _template(self, messages, generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)

    def new_turn_ids(self, text: str) -> list[int]:
        """Token ids to feed for a new user message: the close of the last reply, then the new turn."""
        full = self._template([*self.messages, {"role": "user", "content": text}], True)
        pieces: list[int] = []
        if not self.prompted:
            new_text = full
        else:
            # what the template puts after the reply (e.g. "<|im_end|>\n"): the reply tokens are in the cache
            closed = self._template(self.messages, False)
            reply = self.messages[-1]["content"]
            assistant = closed[len(self.prompted):] if closed.startswith(self.prompted) else ""
            closing = self.tokenizer.eos_token or ""
            for shown in (reply, reply.strip()):  # templates may trim the reply
                at = assistant.find(shown) if assistant else -1
                if at >= 0:
                    closing = assistant[at + len(shown):]
                    break
            if self.unfed is not None:
                pieces.append(self.unfed)  # the reply's last token, cut off by --max-new-tokens
            new_text = closing + (full[len(closed):] if full.startswith(closed) else self._user_only(text))
        pieces += self.tokenizer(new_text, add_special_tokens=False)["input_ids"]
        self.messages.append({"role": "user", "content": text})
        self.prompted = full
        return pieces

    def _user_only(self, text: str) -> str:
        """Fallback when a template re-renders earlier turns differently: this turn on its own."""
        return self._template([{"role": "user", "content": text}], True)

    def add_reply(self, generated: list[int], eos: set[int]) -> str:
        ended = bool(generated) and generated[-1] in eos
        body = generated[:-1] if ended else generated
        self.unfed = None if ended or not generated else generated[-1]
        reply = self.tokenizer.decode(body, skip_special_tokens=True)
        self.messages.append({"role": "assistant", "content": reply})
        return reply


def _eos_ids(model, tokenizer) -> set[int]:
    eos = set()
    for value in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(value, int):
            eos.add(value)
        elif value:
            eos.update(int(v) for v in value)
    return eos


def _stats_line(session: ChatSession) -> str:
    from .generation import _slots, cache_bytes
    from .memory import current_rss_bytes, peak_rss_bytes

    cache = session.cache
    rss = current_rss_bytes()
    budget = f" (budget {session.budget})" if session.method != "full" else ""
    seen = getattr(cache, "seen", None)
    seen = cache.get_seq_length() if seen is None else seen
    return (
        f"[stats] {session.method}: {_slots(cache)} slots/layer{budget} | {seen} tokens seen | "
        f"cache {cache_bytes(cache) / 2**20:.2f} MiB | RSS {rss / 2**20:.1f} MiB "
        f"(peak {max(rss, peak_rss_bytes()) / 2**20:.1f} MiB) | {sum(m['role'] == 'user' for m in session.messages)} turns"
    )


def run_cli(args, model=None, tokenizer=None) -> list[TurnRecord]:
    """Run the chat loop on ``sys.stdin`` / ``sys.stdout``; return one record per answered turn."""
    import torch

    from .cli import DTYPES
    from .generation import IncrementalText, _slots, stream_tokens

    if model is None or tokenizer is None:
        from .models import load_model

        model, tokenizer = load_model(args.model, dtype=getattr(torch, DTYPES[args.dtype]))
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; lacache chat needs one (use an instruct model)")
    torch.manual_seed(args.seed)
    options = {} if args.sinks is None or args.method == "full" else {"sinks": args.sinks}
    session = ChatSession(model, tokenizer, args.method, args.budget, options, system=args.system)
    eos = _eos_ids(model, tokenizer)
    stdin, out = sys.stdin, sys.stdout
    interactive = stdin.isatty()
    records: list[TurnRecord] = []
    turn_seed = args.seed
    while True:
        if interactive:
            out.write("> ")
            out.flush()
        line = stdin.readline()
        if not line:  # end of input
            break
        text = line.rstrip("\r\n")
        command = text.strip()
        if not command:
            continue
        if command in ("/quit", "/exit"):
            break
        if command == "/stats":
            print(_stats_line(session), file=out, flush=True)
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
        text_out = IncrementalText(tokenizer)
        for token_id in stream_tokens(
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
            TurnRecord(len(records) + 1, len(ids), len(generated), _slots(session.cache),
                       int(getattr(session.cache, "seen", session.cache.get_seq_length())), reply)
        )
    return records


def main(argv: list[str] | None = None) -> int:
    """``python -m lacache.chat ...``: the same as ``lacache chat ...``."""
    from .cli import main as cli_main

    return cli_main(["chat", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
