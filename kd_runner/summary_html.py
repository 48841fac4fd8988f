"""summary.html: the sweep summary as one self-contained page (sortable tables, plots inline, relative links
to each job's report), for a browser opened on the sweep dir with no network.

Kept apart from :mod:`kd_runner.summary`, which reads the job dirs and writes the csv/md/plots: this module only
renders what it collected, with the formatting helpers summary.md uses, so both show the same numbers.
"""

from __future__ import annotations

import base64
import html
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote

from kd_runner.summary import (
    SEED_KEYS,
    _count_line,
    _describe,
    _differing,
    _export_note,
    _export_value,
    _fmt,
    _is_number,
    _num,
    _overview,
    export_columns,
)

_CSS = r"""
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.3em; word-break: break-all; }
h2 { font-size: 1.1em; margin-top: 1.5em; }
table { border-collapse: collapse; margin: .5em 0 1em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; white-space: nowrap; }
th, td.t { text-align: left; }
th { background: #f0f0f0; cursor: pointer; user-select: none; white-space: normal; vertical-align: bottom; }
th.asc::after { content: " \25B2"; } th.desc::after { content: " \25BC"; }
th.asc, th.desc { background: #dde6f3; }
tr.failed td { background: #fdecea; } tr.stale td { color: #888; }
td.note { white-space: normal; min-width: 16em; max-width: 40em; }
.wide { overflow-x: auto; }
code { background: #f4f4f4; padding: 0 3px; }
img { max-width: 100%; border: 1px solid #ddd; }
.small { color: #666; font-size: .9em; }
"""

# click a header: sort by it (numbers as numbers, blanks last), click again: reverse; #sort=<col> or #sort=-<col>
# in the URL sorts every table with that column on load
_JS = """
(function () {
  function key(td) {
    var v = td.getAttribute('data-v'), t = td.textContent.trim();
    if (v !== null) return [0, parseFloat(v)];
    if (t === '') return [2, ''];
    var n = Number(t);
    return isNaN(n) ? [1, t] : [0, n];
  }
  function cmp(a, b, desc) {
    if (a[0] !== b[0]) return a[0] - b[0];
    var c = a[0] === 0 ? a[1] - b[1] : a[1].localeCompare(b[1], undefined, {numeric: true});
    return desc ? -c : c;
  }
  function sortBy(th, desc) {
    var table = th.closest('table'), body = table.tBodies[0], i = th.cellIndex;
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (r, s) { return cmp(key(r.cells[i]), key(s.cells[i]), desc); });
    rows.forEach(function (r) { body.appendChild(r); });
    table.querySelectorAll('th').forEach(function (h) {
      h.classList.remove('asc', 'desc'); h.removeAttribute('aria-sort');
    });
    th.classList.add(desc ? 'desc' : 'asc');
    th.setAttribute('aria-sort', desc ? 'descending' : 'ascending');
  }
  var heads = document.querySelectorAll('table.sortable th');
  heads.forEach(function (th) {
    th.addEventListener('click', function () { sortBy(th, th.classList.contains('asc')); });
  });
  function fromHash() {
    var m = /(?:^#|&)sort=(-?)([^&]+)/.exec(location.hash);
    if (!m) return;
    var col = decodeURIComponent(m[2]);
    heads.forEach(function (th) { if (th.getAttribute('data-col') === col) sortBy(th, m[1] === '-'); });
  }
  window.addEventListener('hashchange', fromHash);
  fromHash();
})();
"""


def _td(text, value=None, cls: str | None = None, raw: bool = False) -> str:
    """A cell: ``text`` escaped (``raw``: already HTML), ``value`` the number it sorts by."""
    attrs = (f' data-v="{value!r}"' if _is_number(value) else "") + (f' class="{cls}"' if cls else "")
    return f"<td{attrs}>{text if raw else html.escape(str(text))}</td>"


def _swept_td(value: str | None) -> str:
    num = _num(value) if value is not None else None
    return _td(value or "", num if isinstance(num, float) else None, None if isinstance(num, float) else "t")


def _table(table_id: str, columns: list[tuple[str, str]], rows: list[tuple[str, list[str]]]) -> str:
    """A sortable table: ``columns`` as (column id for ``#sort=``, header), ``rows`` as (row class, cells)."""
    head = "".join(f'<th data-col="{html.escape(col)}" title="click to sort">{html.escape(label)}</th>'
                   for col, label in columns)
    body = "\n".join(f"<tr{f' class={cls!r}' if cls else ''}>{''.join(cells)}</tr>" for cls, cells in rows)
    return (f'<div class="wide"><table class="sortable" id="{table_id}">\n<thead><tr>{head}</tr></thead>\n'
            f"<tbody>\n{body}\n</tbody>\n</table></div>")


def _files(sweep_dir: Path, job: str) -> list[str]:
    """The job's report.md and report.json (error.txt for a failed job), those that exist."""
    return [n for n in ("report.md", "report.json", "error.txt") if (sweep_dir / job / n).is_file()]


def _href(job: str, name: str) -> str:
    return html.escape(quote(f"{job}/{name}"))


def _links(sweep_dir: Path, job: str) -> str:
    """Relative links to the job's files (:func:`_files`)."""
    return " ".join(f'<a href="{_href(job, n)}">{html.escape(n)}</a>' for n in _files(sweep_dir, job))


def _job_table(sweep_dir: Path, listed: list[dict], shown: list[str], ecols: list[tuple]) -> str:
    swept = [k for k in shown if k not in SEED_KEYS]
    columns = [("job", "job"), ("status", "status"), *((k, k) for k in swept), ("seed", "seed"),
               ("teacher_acc", "teacher %"), ("baseline_acc", "baseline %"), ("student_acc", "student %"),
               ("kd_gain", "KD gain"), ("wall_s", "wall s"), *((c[0], c[3]) for c in ecols),
               *([("export", "export")] if ecols else []), ("teacher_source", "teacher from"),
               ("report", "report"), ("note", "note")]
    rows = []
    for r in listed:
        num = _num(r["job"])
        seed = _num(r["seed"]) if r["seed"] is not None else None
        first = next(iter(_files(sweep_dir, r["job"])), None)  # the job number links to its report (or error)
        job = f'<a href="{_href(r["job"], first)}">{html.escape(r["job"])}</a>' if first else html.escape(r["job"])
        cells = [_td(job, num if isinstance(num, float) else None, "t", raw=True), _td(r["status"], cls="t"),
                 *(_swept_td(r["overrides"].get(k)) for k in swept),
                 _td("" if seed is None else f"{seed:g}" if isinstance(seed, float) else seed, seed),
                 *(_td(_fmt(r[m]), r[m]) for m in ("teacher_acc", "baseline_acc", "student_acc")),
                 _td(_fmt(r["kd_gain"], "+.2f"), r["kd_gain"]), _td(_fmt(r["wall_s"], ".1f"), r["wall_s"]),
                 *(_td(_fmt(_export_value(r, c), c[4]), _export_value(r, c)) for c in ecols),
                 *([_td(_export_note(r), cls="t")] if ecols else []),
                 _td(r["teacher_source"] or "", cls="t"), _td(_links(sweep_dir, r["job"]), cls="t", raw=True),
                 _td(r["reason"] or "", cls="t note")]
        rows.append((r["status"] if r["status"] != "complete" else "", cells))
    return _table("jobs", columns, rows)


def _group_table(grouped: list[dict], gkeys: list[str]) -> str:
    metrics = (("teacher_acc", "teacher %"), ("baseline_acc", "baseline %"), ("student_acc", "student %"),
               ("kd_gain", "KD gain"))
    rows = []
    for g in grouped:
        cells = [*(_swept_td(g["setting"][k]) for k in gkeys), _td(g["n"], g["n"])]
        for m, _ in metrics:
            mean, std = g[f"{m}_mean"], g[f"{m}_std"]
            cells.append(_td("-" if mean is None else f"{_fmt(mean)} \u00b1 {_fmt(std)}", mean))
        rows.append(("", cells))
    return _table("groups", [*((k, k) for k in gkeys), ("n", "n"), *metrics], rows)


def _img(sweep_dir: Path, name: str) -> str:
    data = base64.b64encode((sweep_dir / name).read_bytes()).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(name)}">'
            f"<figcaption class=\"small\">{html.escape(name)}</figcaption></figure>")


def render(sweep_dir: Path, found: dict, grouped: list[dict], gkeys: list[str], plots: list[str]) -> str:
    """summary.html's text: one file that opens from the file system with no network (CSS, JS and plots
    inline). ``found`` is :func:`kd_runner.summary.collect`'s result, ``grouped`` :func:`~kd_runner.summary.group`'s,
    ``gkeys`` the keys of its settings, ``plots`` the PNG names written into ``sweep_dir``."""
    e = html.escape
    listed, shown, fixed = _overview(found)
    ecols = export_columns(listed)
    title = f"Sweep summary: {sweep_dir.resolve()}"
    shared = ", ".join(f"<code>{e(f'{k}={v}')}</code>" for k, v in fixed.items()) or "none"
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
           f"<h1>{e(title)}</h1>", f'<p id="counts">{e(_count_line(found))}. Shared overrides: {shared}.</p>']
    for kind, intro in (("failed", "job(s) failed (no numbers; each job dir's error.txt holds the reason)"),
                        ("stale", "stale report(s), listed but left out of the means and plots")):
        if found[kind]:
            out.append(f"<p><b>{len(found[kind])} {e(intro)}:</b></p><ul>")
            out += [f"<li>job {e(r['job'])} ({e(_describe(r['overrides'], shown))}): {e(r['reason'] or '')}</li>"
                    for r in found[kind]]
            out.append("</ul>")
    if found["left_out"]:
        out.append(f"<p>Left out: {len(found['left_out'])} job dir(s) from an earlier multirun into this dir with "
                   "another grid: " + e("; ".join(f"{j['job']} ({_describe(_differing(j['overrides'], fixed))})"
                                                 for j in found["left_out"]))
                   + ". <code>kd-summarize DIR</code> lists them as stale.</p>")
    out.append("<h2>Mean \u00b1 std over seeds</h2>")
    if grouped:
        if found["failed"] or found["stale"]:
            out.append(f"<p>Over the {len(found['rows'])} complete jobs only.</p>")
        out.append(_group_table(grouped, gkeys))
    else:
        out.append("<p>No complete jobs.</p>")
    out += ["<h2>Per job</h2>", _job_table(sweep_dir, listed, shown, ecols)]
    if plots:
        out += ["<h2>Plots</h2>", *(_img(sweep_dir, p) for p in plots)]
    written = datetime.now(timezone.utc).isoformat(timespec="seconds")
    out += [f'<p class="small">Written by kd-summarize at {written}. Click a column header to sort (again to '
            'reverse); <code>summary.html#sort=student_acc</code> opens sorted. Also: '
            '<a href="summary.md">summary.md</a>, <a href="summary.csv">summary.csv</a>, '
            '<a href="summary_groups.csv">summary_groups.csv</a>.</p>',
            f"<script>{_JS}</script>", "</body></html>"]
    return "\n".join(out) + "\n"
