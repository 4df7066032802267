"""An endless conversation: what a fixed-memory cache is for.

``lacache chat --demo`` (the ``make demo`` job) feeds these questions one after another into one
conversation held in one bounded cache. Each is answered to its end, and the memory line after
every turn stays flat while the conversation grows to many times the budget. Varied questions
keep a small model on fresh ground; forcing it to write past its end of text instead makes any
small model loop, with or without a cache of bounded size, which would show the set-up, not the
cache. :func:`distinct_ngram_share` measures that looping.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["DEMO_QUESTIONS", "distinct_ngram_share", "repetition_summary"]

DEMO_QUESTIONS: tuple[str, ...] = (
    "Why is the sky blue during the day and red at sunset?",
    "Give me three tips for keeping basil alive on a windowsill.",
    "What is the difference between weather and climate?",
    "Explain what a prime number is to a ten-year-old.",
    "How did people tell the time before mechanical clocks?",
    "Write a short poem about a lighthouse keeper.",
    "What does a compiler do, in two or three sentences?",
    "Suggest a simple vegetarian dinner I can cook in twenty minutes.",
    "Why do cats purr?",
    "What are the main causes of inflation?",
    "How do bees make honey?",
    "Describe the water cycle step by step.",
    "What is a good way to start learning a new language as an adult?",
    "Why does ice float on water?",
    "Tell me a fun fact about octopuses.",
    "What is the Pythagorean theorem used for in everyday life?",
    "How should I prepare for a job interview?",
    "What happened to the dinosaurs?",
    "Explain how a bicycle stays upright while moving.",
    "What is the difference between a virus and a bacterium?",
    "Recommend a routine for a short morning stretch.",
    "How does a refrigerator keep food cold?",
    "What makes a good story opening? Give an example.",
    "Why do we have leap years?",
    "How do airplanes stay in the air?",
    "What is photosynthesis and why does it matter?",
    "Give me a packing list for a weekend hiking trip.",
    "What is the tallest mountain in the solar system?",
    "How can I explain recursion with a real-world example?",
    "What are some ways to reduce food waste at home?",
    "Why do leaves change colour in autumn?",
    "What is the difference between a list and a tuple in Python?",
)


def distinct_ngram_share(tokens: Sequence, n: int = 4, window: int = 500) -> list[float]:
    """Per block of ``window`` tokens, the share of its ``n``-grams that are distinct.

    1.0 means no ``n``-gram repeats inside the block; a text stuck in a loop falls towards 0. Blocks
    shorter than ``n + 1`` tokens (a short tail) are skipped.
    """
    if n < 1 or window < 1:
        raise ValueError(f"n={n} and window={window} must be >= 1, e.g. n=4, window=500")
    shares = []
    for start in range(0, len(tokens), window):
        block = list(tokens[start : start + window])
        grams = [tuple(block[i : i + n]) for i in range(len(block) - n + 1)]
        if len(grams) >= 2:
            shares.append(len(set(grams)) / len(grams))
    return shares


def repetition_summary(tokens: Sequence, n: int = 4, window: int = 500) -> str:
    """One line: the mean and lowest distinct-``n``-gram share per ``window`` tokens."""
    shares = distinct_ngram_share(tokens, n, window)
    if not shares:
        return f"too few tokens ({len(tokens)}) to measure repetition"
    return (f"distinct {n}-grams per {window} tokens: mean {sum(shares) / len(shares):.3f}, lowest "
            f"{min(shares):.3f} over {len(shares)} blocks")
