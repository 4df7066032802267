"""One page for many runs: ``lacache report`` and the generated tables of docs/results.md.

Results are read back from what the commands wrote (:mod:`.discover`), turned into a few plain
record types whatever their source (:mod:`.records`: a run's JSON, or a CSV kept in docs/), and
shown through one set of table functions (:mod:`.tables`). The same tables become an HTML page
(:mod:`.html`, figures in :mod:`.figures`) or markdown regions of a document (:mod:`.markdown`), so a
published table and the data behind it cannot drift apart.
"""

from .discover import Discovery, Result, discover
from .html import build_report, write_report
from .markdown import regenerate_markdown
from .tables import Cell, Table

__all__ = ["Cell", "Discovery", "Result", "Table", "build_report", "discover", "regenerate_markdown", "write_report"]
