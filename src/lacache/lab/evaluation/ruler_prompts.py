"""Prompt generators for the RULER-style tasks of :mod:`.ruler`: exact lengths, known answers.

Every prompt is built in token space, like the pass key's, so its length is exact and the token
spans of its needles are known (e.g. to check which spans a method evicted). Keys, numbers and list
words are drawn from per-task random streams and checked to occur nowhere else in the prompt, so a
substring match of a reference in an answer can only come from the needle it names.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..._lazy import torch
from .passkey import FILLERS, filler_ids

__all__ = [
    "TASKS",
    "WORDS",
    "RulerPrompt",
    "build_common_words",
    "build_niah_multikey",
    "build_niah_multivalue",
    "build_ruler_prompt",
    "build_variable_tracking",
]

TASKS = ("niah_multikey", "niah_multivalue", "variable_tracking", "common_words")

# A fixed vocabulary of plain nouns for keys and list words: local, reproducible, and pruned so that
# no word contains another (substring scoring would otherwise credit "ant" inside "giant").
_WORD_TEXT = """
apple river stone cloud tiger candle mirror garden rocket violin forest button pillow copper desert
engine feather ginger hammer island jacket kettle ladder magnet needle orange pepper quartz rabbit
saddle tomato umbrella velvet walnut yogurt zebra anchor basket cactus dragon falcon guitar helmet
igloo jungle lantern marble nectar oyster parrot puzzle raven silver turtle valley window badger
bottle canyon dolphin eagle fabric glacier harbor insect jelly koala lemon meadow noodle ocean pencil
quiver ribbon salmon tunnel uniform vessel wagon yacht blanket cherry donkey flute goblet hazel iris
jasmine kayak lobster mango nutmeg olive pebble quilt radish spider thistle urchin vortex willow acorn
bamboo cobalt dagger elbow fossil gravel hornet ivory jigsaw kernel lizard mustard nickel orchid
raisin shovel trumpet walrus beacon carrot cobra dinosaur falafel gazelle hedgehog iceberg juniper
kiwi leopard mammoth nomad otter panda quokka rhino squirrel tulip unicorn viking wombat bagel comet
daisy emerald fjord gorilla husky jaguar kitten llama moose narwhal octopus pelican quail robin
sparrow toucan vulture weasel bison camel duck elk ferret goose hippo ibis jackal lynx mole newt
owl puma seal swan tapir viper wolf yak biscuit cookie donut muffin pretzel waffle crayon easel
folder glove hanger ink jar kite lamp mitten napkin paddle rake scarf thimble vase whistle zipper
barrel cradle drum fiddle gong harp lute oboe piano banjo cello tuba bugle sitar
"""


def _prune_words(words: Sequence[str]) -> tuple[str, ...]:
    unique = list(dict.fromkeys(words))
    return tuple(w for w in unique if not any(o != w and o in w for o in unique))


WORDS = _prune_words(_WORD_TEXT.split())

NIAH_INSTRUCTION = (
    "Some special magic numbers are hidden inside the following text. Find them and memorize them. "
    "I will quiz you about them.\n"
)
NIAH_NEEDLE = " One of the special magic numbers for {key} is: {value}."
MULTIKEY_QUESTION = "\nWhat is the special magic number for {key}? The special magic number for {key} is"
MULTIVALUE_QUESTION = (
    "\nWhat are all the special magic numbers for {key}? The special magic numbers for {key} are"
)
VT_INSTRUCTION = "Memorize and track the chains of variable assignments hidden in the following text.\n"
VT_NEEDLE = " VAR {name} = {value}."
VT_QUESTION = (
    "\nQuestion: Which {count} variables are assigned the value {value} in the text above? "
    "Answer: The variables assigned the value {value} are: VAR"
)
CWE_INSTRUCTION = (
    "Below is a numbered list of words. Some words appear many times and others only once or twice. "
    "Memorize the ones that appear most often.\n"
)
CWE_ENTRY = "{index}. {word}\n"
CWE_QUESTION = (
    "Question: What are the {count} most common words in the list above? "
    "Answer: The {count} words that appear most often in the list are:"
)


@dataclass
class RulerPrompt:
    """One generated prompt and what a correct answer must contain."""

    task: str
    input_ids: torch.Tensor  # [1, length]
    references: list[str]
    #: [start, end) token spans of every needle (for common_words: of each common word's entries)
    needle_spans: list[tuple[int, int]]
    query: str  # the key, value or count the question asks about


def _rng(task: str, seed: int) -> random.Random:
    """Per-task streams, so one seed does not give every task the same keys and numbers."""
    return random.Random(f"{task}:{seed}")


def _tokens(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _sentence_ends(tokenizer, ids: Sequence[int]) -> list[int]:
    """Cut points after a sentence end, so needles do not split words of the haystack."""
    pieces = tokenizer.batch_decode([[t] for t in ids])
    cuts = [0] + [i + 1 for i, p in enumerate(pieces) if p.rstrip().endswith((".", "!", "?"))]
    return sorted(set(cuts) | {len(ids)})


def _spread_depths(rng: random.Random, count: int) -> list[float]:
    """One random depth per equal slice of the haystack: random, yet never all bunched together."""
    return [(i + rng.random()) / count for i in range(count)]


def _insert_needles(
    tokenizer, head: list[int], filler: list[int], needles: list[list[int]], tail: list[int], rng: random.Random
) -> tuple[list[int], list[tuple[int, int]]]:
    """``head + filler-with-needles + tail``, needles in the given order at spread, sentence-aligned depths."""
    cuts = _sentence_ends(tokenizer, filler)
    targets = [round(d * len(filler)) for d in _spread_depths(rng, len(needles))]
    points = sorted(min(cuts, key=lambda c, t=t: (abs(c - t), c)) for t in targets)
    ids, spans, previous = list(head), [], 0
    for point, needle in zip(points, needles):
        ids += filler[previous:point]
        spans.append((len(ids), len(ids) + len(needle)))
        ids += needle
        previous = point
    ids += filler[previous:] + tail
    return ids, spans


def _haystack_text(tokenizer, filler: str, length: int, rng: random.Random) -> tuple[list[int], str]:
    """Filler ids (more than needed; prompts take a prefix) and their text, to keep needles out of it."""
    ids = filler_ids(tokenizer, filler, length, rng)
    return ids, tokenizer.decode(ids)


def _fresh(rng: random.Random, draw: Callable[[random.Random], str], avoid: str, taken: set[str]) -> str:
    """A draw that occurs nowhere in ``avoid`` and overlaps no earlier draw, so counts stay exact."""
    for _ in range(1000):
        item = draw(rng)
        if item not in avoid and not any(item in t or t in item for t in taken):
            taken.add(item)
            return item
    raise ValueError("could not draw a key or value absent from the haystack; use another filler or seed")


def _word_key(rng: random.Random) -> str:
    first, second = rng.sample(WORDS, 2)
    return f"{first}-{second}"


def _number(digits: int) -> Callable[[random.Random], str]:
    return lambda rng: str(rng.randrange(10 ** (digits - 1), 10**digits))


def _variable(rng: random.Random) -> str:
    return "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))


def _layout(tokenizer, length: int, head: str, needles: list[str], tail: str, filler: list[int],
            rng: random.Random) -> tuple[list[int], list[tuple[int, int]]]:
    head_ids, tail_ids = _tokens(tokenizer, head), _tokens(tokenizer, tail)
    needle_ids = [_tokens(tokenizer, n) for n in needles]
    room = length - len(head_ids) - len(tail_ids) - sum(map(len, needle_ids))
    if room < 0:
        raise ValueError(f"length={length} is too short for the instruction, needles and question ({length - room})")
    return _insert_needles(tokenizer, head_ids, filler[:room], needle_ids, tail_ids, rng)


def build_niah_multikey(
    tokenizer, length: int, seed: int = 0, filler: str = "grass", keys: int = 4
) -> RulerPrompt:
    """``keys`` magic-number needles with different keys; the question asks for one of them.

    The other needles are distractors of the same form, so a method must keep the right one, not
    just any number-shaped span.
    """
    if keys < 1:
        raise ValueError(f"keys={keys} must be at least 1")
    rng = _rng("niah_multikey", seed)
    haystack, avoid = _haystack_text(tokenizer, filler, length, rng)
    taken: set[str] = set()
    pairs = [(_fresh(rng, _word_key, avoid, taken), _fresh(rng, _number(7), avoid, taken)) for _ in range(keys)]
    rng.shuffle(pairs)
    key, value = pairs[rng.randrange(keys)]
    needles = [NIAH_NEEDLE.format(key=k, value=v) for k, v in pairs]
    ids, spans = _layout(tokenizer, length, NIAH_INSTRUCTION, needles, MULTIKEY_QUESTION.format(key=key),
                         haystack, rng)
    return RulerPrompt("niah_multikey", torch.tensor([ids]), [value], spans, key)


def build_niah_multivalue(
    tokenizer, length: int, seed: int = 0, filler: str = "grass", values: int = 4
) -> RulerPrompt:
    """One key with ``values`` numbers at different depths; all of them are asked for."""
    if values < 1:
        raise ValueError(f"values={values} must be at least 1")
    rng = _rng("niah_multivalue", seed)
    haystack, avoid = _haystack_text(tokenizer, filler, length, rng)
    taken: set[str] = set()
    key = _fresh(rng, _word_key, avoid, taken)
    numbers = [_fresh(rng, _number(7), avoid, taken) for _ in range(values)]
    needles = [NIAH_NEEDLE.format(key=key, value=v) for v in numbers]
    ids, spans = _layout(tokenizer, length, NIAH_INSTRUCTION, needles, MULTIVALUE_QUESTION.format(key=key),
                         haystack, rng)
    return RulerPrompt("niah_multivalue", torch.tensor([ids]), numbers, spans, key)


def _interleave(rng: random.Random, chains: list[list[str]]) -> list[str]:
    """Mix the chains' statements randomly while keeping each chain's own order (define, then copy)."""
    order = [c for c, chain in enumerate(chains) for _ in chain]
    rng.shuffle(order)
    cursors = [iter(chain) for chain in chains]
    return [next(cursors[c]) for c in order]


def build_variable_tracking(
    tokenizer, length: int, seed: int = 0, filler: str = "grass", chains: int = 1, hops: int = 2
) -> RulerPrompt:
    """``chains`` assignment chains ``VAR A = 12345. ... VAR B = A. ...`` of ``hops`` copies each.

    The question names the first chain's value; the answer is every variable of that chain, so each
    hop's statement has to survive, in order. Further chains (other values) are distractors.
    """
    if chains < 1 or hops < 0:
        raise ValueError(f"chains={chains} must be >= 1 and hops={hops} >= 0")
    rng = _rng("variable_tracking", seed)
    haystack, avoid = _haystack_text(tokenizer, filler, length, rng)
    taken: set[str] = set()
    names, statements, values = [], [], []
    for _ in range(chains):
        chain = [_fresh(rng, _variable, avoid, taken) for _ in range(hops + 1)]
        value = _fresh(rng, _number(5), avoid, taken)
        names.append(chain)
        values.append(value)
        statements.append([VT_NEEDLE.format(name=chain[0], value=value)]
                          + [VT_NEEDLE.format(name=b, value=a) for a, b in itertools.pairwise(chain)])
    tail = VT_QUESTION.format(value=values[0], count=hops + 1)
    ids, spans = _layout(tokenizer, length, VT_INSTRUCTION, _interleave(rng, statements), tail, haystack, rng)
    return RulerPrompt("variable_tracking", torch.tensor([ids]), names[0], spans, values[0])


def _cwe_words(rng: random.Random, common: int, common_freq: int, rare_freq: int,
               entries: int) -> tuple[list[str], list[str]]:
    """(common words, shuffled list): each common word ``common_freq`` times, rare words filling ``entries``."""
    pool = list(WORDS)
    rng.shuffle(pool)
    tops, rest = pool[:common], pool[common:]
    rare_slots = max(0, entries - common * common_freq)
    freq = max(rare_freq, math.ceil(rare_slots / max(1, len(rest))))
    if freq >= common_freq:
        raise ValueError(
            f"{entries} list entries need rare words {freq} times each, not fewer than the common words' "
            f"{common_freq}: raise common_freq or shorten the prompt"
        )
    rare = rest[: math.ceil(rare_slots / freq)]
    words = tops * common_freq + (rare * freq)[:rare_slots]
    rng.shuffle(words)
    return tops, words


def _render_list(tokenizer, words: Sequence[str]) -> list[list[int]]:
    texts = [CWE_ENTRY.format(index=i + 1, word=w) for i, w in enumerate(words)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def _entries_for(tokenizer, room: int) -> int:
    """How many entries fill ``room`` tokens, slightly over so that trimming, not padding, fits the list."""
    guess = max(1, room // 4)
    for _ in range(2):  # entry size grows with the number of digits of its index
        sample = _render_list(tokenizer, [WORDS[i % len(WORDS)] for i in range(guess)])
        guess = max(1, round(room * len(sample) / sum(map(len, sample))))
    return guess + 2 + guess // 50


def _fit_list(tokenizer, words: list[str], keep: set[str], room: int) -> tuple[list[str], list[list[int]]]:
    """Drop rare entries from the end until the rendered list fits ``room`` tokens.

    Only rare words are dropped, so the common words keep their exact counts and stay the top ones;
    what is left over is less than one entry.
    """
    entries = _render_list(tokenizer, words)
    while (total := sum(map(len, entries))) > room:
        drop = max(1, int((total - room) / (total / len(entries))))
        indices = [i for i in range(len(words) - 1, -1, -1) if words[i] not in keep][:drop]
        if not indices:
            raise ValueError(f"{room} tokens cannot hold the common words' entries; lengthen the prompt")
        gone = set(indices)
        words = [w for i, w in enumerate(words) if i not in gone]
        entries = _render_list(tokenizer, words)
    return words, entries


def build_common_words(
    tokenizer,
    length: int,
    seed: int = 0,
    filler: str = "grass",
    common: int = 10,
    common_freq: int | None = None,
    rare_freq: int = 1,
    common_share: float = 0.5,
) -> RulerPrompt:
    """A numbered word list whose ``common`` words each occur ``common_freq`` times; name those words.

    No needle holds the answer: it is a count over the whole list, which eviction can only blur.
    ``common_freq`` defaults to what gives the common words ``common_share`` of the list. The list
    is the haystack (``filler`` is ignored); the few tokens left over (less than one entry) pad it
    with newlines so the length is exact.
    """
    del filler  # the list is the haystack
    if common < 1 or rare_freq < 1 or not 0 < common_share < 1:
        raise ValueError(f"common={common}, rare_freq={rare_freq} must be >= 1 and common_share in (0, 1)")
    rng = _rng("common_words", seed)
    head, tail = _tokens(tokenizer, CWE_INSTRUCTION), _tokens(tokenizer, CWE_QUESTION.format(count=common))
    room = length - len(head) - len(tail)
    if room <= 0:
        raise ValueError(f"length={length} is too short for the instruction and question ({len(head) + len(tail)})")
    entries = _entries_for(tokenizer, room)
    if common_freq is None:
        common_freq = max(rare_freq + 1, round(entries * common_share / common))
    tops, words = _cwe_words(rng, common, common_freq, rare_freq, entries)
    words, rendered = _fit_list(tokenizer, words, set(tops), room)
    newline = _tokens(tokenizer, "\n")
    ids, spans = list(head), []
    for word, entry in zip(words, rendered):
        if word in tops:
            spans.append((len(ids), len(ids) + len(entry)))
        ids += entry
    ids += newline * ((length - len(ids) - len(tail)) // len(newline)) + tail
    if len(ids) != length:  # only if a newline took more than one token
        raise ValueError(f"could not pad the word list to exactly {length} tokens")
    return RulerPrompt("common_words", torch.tensor([ids]), tops, spans, str(common))


_BUILDERS: dict[str, Callable[..., RulerPrompt]] = {
    "niah_multikey": build_niah_multikey,
    "niah_multivalue": build_niah_multivalue,
    "variable_tracking": build_variable_tracking,
    "common_words": build_common_words,
}


def build_ruler_prompt(tokenizer, task: str, length: int, seed: int = 0, filler: str = "grass",
                       **options) -> RulerPrompt:
    """A prompt of exactly ``length`` tokens for ``task``; ``options`` go to that task's builder."""
    if task not in _BUILDERS:
        raise ValueError(f"task={task!r} must be one of {TASKS}")
    if filler not in FILLERS:
        raise ValueError(f"filler={filler!r} must be one of {FILLERS}")
    return _BUILDERS[task](tokenizer, length, seed=seed, filler=filler, **options)
