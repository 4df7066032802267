"""The report page in a real browser: headless Chromium loads it from disk, renders it, screenshots it.

The page's own script writes what it saw onto ``<body>`` once loaded (``data-rendered``, script
errors, tables, figures, images that failed to decode), ``--dump-dom`` returns that DOM, and the
console log must stay empty. A copy of the page with a probe script clicks a column header twice
to check that sorting works. Needs Debian's ``chromium`` (``make test-browser`` installs it);
skipped without it. Set ``LACACHE_SCREENSHOTS`` to a folder to keep the screenshot.
"""

import os
import re
import subprocess
from pathlib import Path

import pytest

from lacache.cli import main as cli_main
from report_runs import make_runs, tiny_model_dir

CHROMIUM = Path(os.environ.get("CHROMIUM") or "/usr/bin/chromium")  # Debian's package `chromium`
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]

# Added to a copy of the page: clicks the last header of the first table twice, as a reader would, and
# writes the column's values after each click onto <body> (its listener runs after the page's own).
SORT_PROBE = """<script>
window.addEventListener("load", function () {
  var table = document.querySelector("table.sortable"), th = table.tHead.rows[0].lastElementChild;
  function column() {
    return Array.prototype.map.call(table.tBodies[0].rows, function (row) {
      return row.cells[th.cellIndex].getAttribute("data-value") || "";
    }).join(";");
  }
  th.click();
  document.body.setAttribute("data-sorted-up", column());
  th.click();
  document.body.setAttribute("data-sorted-down", column());
});
</script>"""

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs chromium (make test-browser installs it)")


def _chromium(profile: Path, *args: str) -> subprocess.CompletedProcess:
    """One headless Chromium run with its own throw-away profile (nothing from the user's, no network)."""
    return subprocess.run([str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                          text=True, timeout=180, check=False)


def test_report_page_renders_without_errors_in_chromium(tmp_path):
    runs = make_runs(tmp_path / "runs", tiny_model_dir(tmp_path / "model"))
    page = tmp_path / "site" / "report.html"
    assert cli_main(["report", str(runs), "-o", str(page)]) == 0
    html = page.read_text(encoding="utf-8")
    url = page.resolve().as_uri()

    dom = _chromium(tmp_path / "profile", "--enable-logging=stderr", "--v=0", "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", dom.stdout)
    assert body, dom.stdout[:2000]
    seen = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', body.group(1)))
    assert seen.get("rendered") == "ok", seen  # the page's script ran to the end
    assert seen["errors"] == "0" and seen["broken-images"] == "0", seen
    assert int(seen["tables"]) == html.count("<table") >= 8, seen
    assert int(seen["figures"]) == html.count("<figure") >= 8, seen
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    assert not console, console

    probe = page.with_name("sort-probe.html")
    probe.write_text(html.replace("</body>", SORT_PROBE + "</body>"), encoding="utf-8")
    sorted_dom = _chromium(tmp_path / "profile", "--dump-dom", probe.resolve().as_uri())
    seen = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', re.search(r"<body([^>]*)>", sorted_dom.stdout).group(1)))
    up = [float(v) for v in seen["sorted-up"].split(";") if v]
    down = [float(v) for v in seen["sorted-down"].split(";") if v]
    assert len(up) >= 2 and up == sorted(up) and down == sorted(up, reverse=True), seen

    shots = Path(os.environ.get("LACACHE_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    shot = shots / "report.png"
    done = _chromium(tmp_path / "profile", f"--screenshot={shot}", "--window-size=1280,2000", url)
    assert done.returncode == 0, done.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 50_000  # a page, not a blank
