"""A multi-turn conversation held in one bounded cache: the library behind ``lacache chat``.

Each user message becomes a chat-template turn; only the tokens of the *new* turn are fed to the
cache (it already holds everything before it, compacted to its budget), so a conversation of any
length costs the same memory. :class:`ChatSession` keeps the messages and the cache in step;
the interactive loop (stdin, ``/stats``, ``/reset``, ``/quit``) is the command in
:mod:`lacache.cli.chat`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ChatSession", "TurnRecord", "eos_ids", "stats_line"]


@dataclass
class TurnRecord:
    """One answered turn: what was fed, what came back, and the cache's size after it."""

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
        from ..registry import make_cache

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


def eos_ids(model, tokenizer) -> set[int]:
    """Token ids that end a reply: the tokenizer's end of sequence and the model's generation config's."""
    eos = set()
    for value in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(value, int):
            eos.add(value)
        elif value:
            eos.update(int(v) for v in value)
    return eos


def stats_line(session: ChatSession) -> str:
    """The ``/stats`` line: slots per layer against the budget, tokens seen, cache size and memory."""
    from ..cache.generation import cache_bytes, cache_slots
    from ..cache.memory import current_rss_bytes, peak_rss_bytes
    from ..registry import method_spec

    cache = session.cache
    rss = current_rss_bytes()
    budget = f" (budget {session.budget})" if method_spec(session.method).bounded else ""
    seen = getattr(cache, "seen", None)
    seen = cache.get_seq_length() if seen is None else seen
    return (
        f"[stats] {session.method}: {cache_slots(cache)} slots/layer{budget} | {seen} tokens seen | "
        f"cache {cache_bytes(cache) / 2**20:.2f} MiB | RSS {rss / 2**20:.1f} MiB "
        f"(peak {max(rss, peak_rss_bytes()) / 2**20:.1f} MiB) | {sum(m['role'] == 'user' for m in session.messages)} turns"
    )
