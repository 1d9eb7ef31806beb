/* lcbench leaderboard: sortable and filterable tables, no dependencies, no network. */
(function () {
  "use strict";
  var NUMBER = /^[-+]?(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$/i;

  function key(cell) {
    var raw = cell.getAttribute("data-v");
    if (raw === null || raw === "") { raw = cell.textContent.trim(); }
    return NUMBER.test(raw) ? { num: parseFloat(raw), text: raw } : { num: null, text: raw.toLowerCase() };
  }

  function compare(a, b, dir) {
    if (a.num !== null && b.num !== null) { return dir * (a.num - b.num); }
    if (a.num !== null) { return -1; }  /* numbers before text and before missing values, either way */
    if (b.num !== null) { return 1; }
    if (a.text === "–" || b.text === "–") { return (a.text === "–") - (b.text === "–"); }
    return dir * a.text.localeCompare(b.text);
  }

  function sortBy(table, th, col) {
    var ascending = th.getAttribute("aria-sort") !== "ascending";
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var dir = ascending ? 1 : -1;
    rows.sort(function (r1, r2) {  /* a reference row (the uncompressed run) stays on top */
      var pinned = r2.classList.contains("reference") - r1.classList.contains("reference");
      return pinned || compare(key(r1.cells[col]), key(r2.cells[col]), dir);
    });
    rows.forEach(function (r) { body.appendChild(r); });
  }

  Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), function (table) {
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, col) {
      th.tabIndex = 0;
      th.title = "sort";
      th.addEventListener("click", function () { sortBy(table, th, col); });
      th.addEventListener("keydown", function (e) { if (e.key === "Enter") { sortBy(table, th, col); } });
    });
  });

  Array.prototype.forEach.call(document.querySelectorAll("input[data-filter]"), function (input) {
    var table = document.getElementById(input.getAttribute("data-filter"));
    var count = document.getElementById(input.getAttribute("data-filter") + "-count");
    input.addEventListener("input", function () {
      var terms = input.value.toLowerCase().split(/\s+/).filter(Boolean);
      var shown = 0;
      Array.prototype.forEach.call(table.tBodies[0].rows, function (row) {
        var text = row.textContent.toLowerCase();
        row.hidden = !terms.every(function (t) { return text.indexOf(t) >= 0; });
        if (!row.hidden) { shown += 1; }
      });
      if (count) { count.textContent = shown + " shown"; }
    });
  });
})();
