"""Every Python snippet of the README's "Use it" section runs alone, as printed, on the bundled model,
and shows the cache compacting: it prints ``kept K of N tokens`` with N above K.

Each runs in a fresh namespace (no snippet may lean on another's names) with nothing replaced: what a
newcomer pastes is what is tested. The vLLM snippet runs in ``make test-vllm``
(``tests/serving/test_vllm_readme.py``).
"""

import contextlib
import io
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

README = Path(__file__).resolve().parents[1] / "README.md"


def usage_blocks() -> list[str]:
    text = README.read_text()
    section = text.split("\n## Use it\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_usage_section_has_its_snippets():
    joined = "\n".join(usage_blocks())
    for needle in ("cache=", "custom_generate=lacache.generate", 'pipeline("text-generation"',
                   'padding_side = "left"', "stream_generate(", "static=True"):
        assert needle in joined, needle


@pytest.mark.parametrize("index", range(len(usage_blocks())))
def test_a_readme_snippet_runs_alone_as_printed_and_shows_eviction(index):
    block = usage_blocks()[index]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(block, f"README.md snippet {index + 1}", "exec"), {"__name__": "__readme__"})
    out = printed.getvalue()
    kept = re.findall(r"kept (\d+) of (\d+) tokens per layer", out)
    assert kept, out
    for slots, seen in kept:
        assert int(seen) > int(slots) > 0, out  # more tokens than the cache holds: it compacted
    assert len(out.strip().splitlines()) >= 2 or "[" in out  # the text too, not only the count
