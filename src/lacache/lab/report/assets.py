"""The report page's inline style and script (the page loads nothing from anywhere else).

The script does two things: clicking a table header sorts the table by that column (numbers by
the value the cell stands for, text alphabetically; a second click reverses), and once the page
has loaded it writes what it saw onto ``<body>``: ``data-rendered="ok"``, the number of script
errors (``data-errors``), tables, figures and images that failed to decode. A test loading the page
in a headless browser reads those back, so "the page rendered" is checked, not assumed.
"""

__all__ = ["SCRIPT", "STYLE"]

STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1200px;
       padding: 0 24px 48px; color: #1d1d1f; background: #fff; }
h1 { margin: 24px 0 4px; } h2 { margin-top: 40px; border-bottom: 2px solid #ddd; padding-bottom: 4px; }
h3 { margin: 0 0 8px; font-size: 16px; }
nav a { margin-right: 14px; }
.lead { color: #555; margin: 0 0 12px; }
article.run { border: 1px solid #ddd; border-radius: 6px; padding: 14px 16px; margin: 16px 0; }
.badge { display: inline-block; font-size: 12px; padding: 1px 8px; border-radius: 10px; margin-left: 8px;
         background: #fde68a; color: #7c4a03; vertical-align: middle; }
.badge.ok { background: #d1fae5; color: #065f46; }
dl.meta { display: grid; grid-template-columns: max-content 1fr; gap: 2px 14px; margin: 8px 0; font-size: 13px; }
dl.meta dt { color: #666; } dl.meta dd { margin: 0; overflow-wrap: anywhere; }
code, pre { font: 12px/1.4 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
pre.command { background: #f5f5f7; padding: 8px 10px; border-radius: 4px; white-space: pre-wrap;
              overflow-wrap: anywhere; margin: 6px 0; }
table { border-collapse: collapse; margin: 10px 0 16px; font-size: 13px; }
caption { text-align: left; font-weight: 600; padding: 4px 0; }
th, td { border: 1px solid #ddd; padding: 3px 8px; }
th { background: #f5f5f7; cursor: pointer; user-select: none; max-width: 18em; }
.scroll { overflow-x: auto; }
th.sorted-asc::after { content: " \\25B2"; font-size: 10px; } th.sorted-desc::after { content: " \\25BC"; font-size: 10px; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.best { font-weight: 700; background: #dcfce7; }
.figures { display: flex; flex-wrap: wrap; gap: 12px; align-items: flex-start; }
figure { margin: 6px 0; max-width: 100%; min-width: 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 12px; color: #666; }
svg text { font: 11px system-ui, sans-serif; fill: #222; }
.files a { margin-right: 10px; }
ul.problems li { margin: 4px 0; }
.note { font-size: 12px; color: #666; }
"""

SCRIPT = """
(function () {
  var errors = 0;
  window.addEventListener("error", function () { errors += 1; });
  function key(cell) {
    var v = cell.getAttribute("data-value");
    return v === null || v === "" ? null : parseFloat(v);
  }
  function sortBy(th) {
    var table = th.closest("table"), body = table.tBodies[0];
    var column = Array.prototype.indexOf.call(th.parentNode.children, th);
    var descending = th.classList.contains("sorted-asc");
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = a.cells[column], y = b.cells[column];
      if (!x || !y) { return 0; }
      var kx = key(x), ky = key(y), order;
      if (kx !== null || ky !== null) {
        if (kx === null) { return 1; }
        if (ky === null) { return -1; }
        order = kx - ky;
      } else {
        order = x.textContent.localeCompare(y.textContent);
      }
      return descending ? -order : order;
    });
    rows.forEach(function (row) { body.appendChild(row); });
    Array.prototype.forEach.call(th.parentNode.children, function (h) {
      h.classList.remove("sorted-asc", "sorted-desc");
    });
    th.classList.add(descending ? "sorted-desc" : "sorted-asc");
  }
  window.addEventListener("load", function () {
    var headers = document.querySelectorAll("table.sortable thead th");
    Array.prototype.forEach.call(headers, function (th) {
      th.addEventListener("click", function () { sortBy(th); });
    });
    var broken = 0;
    Array.prototype.forEach.call(document.images, function (img) {
      if (!img.complete || img.naturalWidth === 0) { broken += 1; }
    });
    var body = document.body;
    body.setAttribute("data-tables", String(document.querySelectorAll("table").length));
    body.setAttribute("data-figures", String(document.querySelectorAll("figure").length));
    body.setAttribute("data-broken-images", String(broken));
    body.setAttribute("data-errors", String(errors));
    body.setAttribute("data-rendered", "ok");
  });
})();
"""
