"""The README's usage snippets run as written (on the bundled model), with fewer new tokens."""

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

README = Path(__file__).resolve().parents[1] / "README.md"


def _usage_blocks() -> list[str]:
    text = README.read_text()
    section = text.split("\n## Use it\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_readme_usage_snippets_run():
    blocks = _usage_blocks()
    joined = "\n".join(blocks)
    # the three integration snippets, the padded batch and the endless stream are all there
    for needle in ("cache=", "custom_generate=lacache.generate", 'pipeline("text-generation"',
                   'padding_side = "left"', "stream_generate("):
        assert needle in joined, needle
    namespace: dict = {}
    for block in blocks:
        # as written, except for how many tokens each call generates (2,000 and 100,000 take minutes here)
        code = re.sub(r"max_new_tokens=[\d_]+", "max_new_tokens=6", block)
        exec(compile(code, str(README), "exec"), namespace)
    assert namespace["cache"].num_slots <= 512
    assert namespace["stats"].cache_bytes > 0 and len(namespace["tokens"]) >= 6
