"""Build history: one JSON line per build (and per validation), plotted by the report.

Each build appends a `build` row with every stage's samples, tokens, reject rate and spoken
fraction; each validation appends a `validation` row naming the build it checked. The file is
append-only JSON Lines: on a local disk a row is one O_APPEND write, so builds of several OUT
folders can share one history (the nightly case: a new OUT per night, one history beside
them); elsewhere (fsspec URIs) the file is rewritten whole under a temporary name and renamed.
A line cut short by a crash is skipped when read, never fatal.

The location is `report.history` in the corpus config (a path or URI; relative paths are
relative to OUT), by default OUT/report/history.jsonl.
"""

from __future__ import annotations

import html
import json
import os
from datetime import UTC, datetime
from typing import Any

from storage import uri

DEFAULT_HISTORY = "report/history.jsonl"
METRICS = (("samples", "samples"), ("tokens", "tokens"), ("reject_rate", "reject rate"),
           ("spoken_fraction", "spoken fraction"))
PALETTE = ["#3366cc", "#dc3912", "#ff9900", "#109618", "#990099", "#0099c6", "#dd4477",
           "#66aa00", "#b82e2e", "#316395"]


def history_path(out: str, configured: str | None = None) -> str:
    """Where OUT's builds are recorded: the configured location (relative: under OUT)."""
    if configured is None:
        configured = _saved_setting(out)
    if not configured:
        return uri.join(out, DEFAULT_HISTORY)
    if "://" in configured or os.path.isabs(configured):
        return configured
    return uri.join(out, configured)


def _saved_setting(out: str) -> str | None:
    """`report.history` of the config OUT was built with (OUT/corpus.yaml), if any."""
    import yaml

    path = uri.join(out, "corpus.yaml")
    if not uri.exists(path):
        return None
    try:
        cfg = yaml.safe_load(uri.read_bytes(path)) or {}
    except yaml.YAMLError:
        return None
    return ((cfg.get("report") or {}).get("history")) if isinstance(cfg, dict) else None


def append_row(path: str, row: dict[str, Any]) -> None:
    line = (json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n").encode()
    if uri.is_local(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if os.path.exists(path) and os.path.getsize(path):
            with open(path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":  # a row cut short by a crash: start on a line of our own
                    line = b"\n" + line
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)  # one write: concurrent appenders never interleave within a row
        finally:
            os.close(fd)
        return
    old = uri.read_bytes(path) if uri.exists(path) else b""
    if old and not old.endswith(b"\n"):
        old += b"\n"
    uri.write_bytes_atomic(path, old + line)


def build_id(build_report: dict[str, Any], out: str) -> str:
    """One build of OUT: its run id (reports written before run ids: its start second)."""
    return f"{build_report.get('run') or build_report.get('started', '')}|{out}"


def stage_figures(mix: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The figures a history row keeps per stage folder, from a data-mix report."""
    rows = {}
    for name, s in mix.get("stages", {}).items():
        rejected = sum(sum(v.values()) for v in s.get("rejects", {}).values())
        inputs = s.get("inputs", 0)
        rows[name] = {
            "samples": s.get("samples", 0), "tokens": s.get("tokens", 0),
            "inputs": inputs, "rejected": rejected,
            "reject_rate": round(rejected / inputs, 6) if inputs else 0.0,
            "spoken_fraction": (s.get("speech_questions") or {}).get("spoken_fraction"),
            "audio_hours": s.get("audio_hours", 0.0), "shards": s.get("shards", 0),
        }
    return rows


def record_build(out: str, build_report: dict[str, Any], mix: dict[str, Any],
                 configured: str | None = None) -> str:
    """Append this build's row; return the history file's location."""
    path = history_path(out, configured)
    append_row(path, {
        "kind": "build", "build": build_id(build_report, out), "out": out,
        "corpus": build_report.get("corpus", ""), "started": build_report.get("started", ""),
        "recorded": datetime.now(UTC).isoformat(timespec="seconds"),
        "code_version": build_report.get("code_version", ""),
        "config_fingerprint": build_report.get("config_fingerprint", ""),
        "accounted": build_report.get("accounted"),
        "stages": stage_figures(mix),
    })
    return path


def record_validation(out: str, verdicts: dict[str, dict[str, Any]],
                      configured: str | None = None) -> str:
    """Append a validation row for OUT's latest build (from OUT/report/build_report.json)."""
    rep_path = uri.join(out, "report", "build_report.json")
    build = json.loads(uri.read_bytes(rep_path)) if uri.exists(rep_path) else {}
    path = history_path(out, configured)
    append_row(path, {
        "kind": "validation", "build": build_id(build, out), "out": out,
        "corpus": build.get("corpus", ""),
        "recorded": datetime.now(UTC).isoformat(timespec="seconds"),
        "stages": {s: {"passed": bool(v.get("passed")),
                       "quarantined": len(v.get("quarantined") or []),
                       "failed": len(v.get("failed") or [])} for s, v in verdicts.items()},
    })
    return path


def load_history(path: str, corpus: str | None = None, last: int = 14) -> list[dict[str, Any]]:
    """The last `last` builds (oldest first), each with its latest validation under
    `validation`; rows of other corpora (a shared file) and torn lines are left out."""
    if not uri.exists(path):
        return []
    builds: dict[str, dict[str, Any]] = {}
    checks: dict[str, dict[str, Any]] = {}
    for line in uri.read_bytes(path).decode("utf-8", "replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if not isinstance(row, dict) or (corpus and row.get("corpus") not in (corpus, "")):
            continue
        if row.get("kind") == "build":
            builds[row.get("build", "")] = row
        elif row.get("kind") == "validation":
            checks[row.get("build", "")] = row
    rows = sorted(builds.values(), key=lambda r: (r.get("started", ""), r.get("recorded", "")))
    for r in rows:
        if r["build"] in checks:
            r["validation"] = checks[r["build"]]["stages"]
    return rows[-last:] if last else rows


# --- HTML ----------------------------------------------------------------------------------

def line_chart(title: str, builds: list[dict[str, Any]], metric: str,
               width: int = 430, height: int = 190) -> str:
    """One line per stage over the builds, as inline SVG (no JavaScript)."""
    e = html.escape
    series: dict[str, list[float | None]] = {}
    for i, b in enumerate(builds):
        for stage, fig in (b.get("stages") or {}).items():
            v = fig.get(metric)
            series.setdefault(stage, [None] * len(builds))[i] = None if v is None else float(v)
    series = {k: v for k, v in sorted(series.items(), key=lambda kv: (kv[0] != "ingest", kv[0]))
              if any(x is not None for x in v) and (metric != "reject_rate" or any(v))}
    if not series or not builds:
        return f'<div class="chart"><h4>{e(title)}</h4><p class="empty">no builds recorded</p></div>'
    left, right, top, bottom = 54, 10, 10, 34
    w, h = width - left - right, height - top - bottom
    vals = [x for v in series.values() for x in v if x is not None]
    hi = max(vals) or 1.0
    n = len(builds)

    def xy(i: int, v: float) -> tuple[float, float]:
        x = left + (w * i / (n - 1) if n > 1 else w / 2)
        return x, top + h - h * v / hi

    fmt = (lambda v: f"{v:.0%}") if metric in ("reject_rate", "spoken_fraction") else _short
    parts = [f'<svg width="{width}" height="{height}" role="img" aria-label="{e(title)}">',
             f'<line x1="{left}" y1="{top + h}" x2="{left + w}" y2="{top + h}" stroke="#999"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + h}" stroke="#999"/>',
             f'<text x="{left - 4}" y="{top + 8}" text-anchor="end">{fmt(hi)}</text>',
             f'<text x="{left - 4}" y="{top + h}" text-anchor="end">0</text>']
    step = max(1, n // 5)
    for i in sorted(set(range(0, n, step)) | {n - 1}):
        x, _ = xy(i, 0)
        label = (builds[i].get("started") or "")[5:16].replace("T", " ")
        anchor = "start" if i == 0 and n > 1 else "end" if i == n - 1 and n > 1 else "middle"
        parts.append(f'<text x="{x:.1f}" y="{top + h + 14}" text-anchor="{anchor}">{e(label)}</text>')
    for j, (stage, v) in enumerate(series.items()):
        color = PALETTE[j % len(PALETTE)]
        pts = [xy(i, x) for i, x in enumerate(v) if x is not None]
        path = " ".join(f"{px:.1f},{py:.1f}" for px, py in pts)
        parts.append(f'<polyline class="series" data-stage="{e(stage)}" fill="none" '
                     f'stroke="{color}" stroke-width="2" points="{path}"/>')
        parts += [f'<circle cx="{px:.1f}" cy="{py:.1f}" r="2.5" fill="{color}"/>' for px, py in pts]
    parts.append("</svg>")
    legend = " ".join(f'<span class="key"><i style="background:{PALETTE[j % len(PALETTE)]}"></i>'
                      f'{e(s)}</span>' for j, s in enumerate(series))
    return f'<div class="chart"><h4>{e(title)}</h4>{"".join(parts)}<div class="legend">{legend}</div></div>'


def _short(v: float) -> str:
    if v >= 1e6:
        return f"{v / 1e6:.1f}M"
    if v >= 1e4:
        return f"{v / 1e3:.0f}k"
    return f"{v:,.0f}"


def render_history(builds: list[dict[str, Any]], path: str) -> str:
    e = html.escape
    out = [f"<section id='history'><h2>History: the last {len(builds)} builds</h2>"
           f"<p class='sub'>from {e(path)}</p><div class='grid'>"]
    out += [line_chart(f"{label} per stage", builds, key) for key, label in METRICS]
    out.append("</div><table><tr><th>build started</th><th>OUT</th><th>samples (all stages)</th>"
               "<th>tokens</th><th>ingest reject rate</th><th>validation</th></tr>")
    for b in reversed(builds):
        st = b.get("stages") or {}
        stages = {k: v for k, v in st.items() if k != "ingest"}
        val = b.get("validation")
        verdict = ("not validated" if val is None else
                   "pass" if all(v["passed"] for v in val.values()) else
                   f"<b class=bad>FAIL ({sum(not v['passed'] for v in val.values())})</b>")
        rr = (st.get("ingest") or {}).get("reject_rate")
        out.append(f"<tr><td>{e(b.get('started', ''))}</td><td>{e(b.get('out', ''))}</td>"
                   f"<td>{sum(v.get('samples', 0) for v in stages.values()):,}</td>"
                   f"<td>{_short(sum(v.get('tokens', 0) for v in stages.values()))}</td>"
                   f"<td>{'-' if rr is None else f'{rr:.1%}'}</td><td>{verdict}</td></tr>")
    out.append("</table></section>")
    return "\n".join(out)
