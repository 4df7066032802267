"""``python -m lacache.support``: print the support matrix as Markdown (docs/support.md)."""

from . import render

print(render(), end="")
