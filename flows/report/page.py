"""The report page: OUT/report/index.html drawn from the data-mix report (flows.report.mix),
with inline SVG bar charts, the verdict table, the galleries and the build history. Pure
rendering: reads nothing from OUT itself.
"""
from __future__ import annotations

import html
from typing import Any

from flows.report.dupes import render_dupes
from flows.report.gallery import CSS as GALLERY_CSS
from storage.parts import REJECTS_DIR

PALETTE = ["#3366cc", "#dc3912", "#ff9900", "#109618", "#990099", "#0099c6", "#dd4477",
           "#66aa00", "#b82e2e", "#316395"]


def bars(title: str, data: dict[str, float], unit: str = "", width: int = 460) -> str:
    """A horizontal bar chart as inline SVG."""
    e = html.escape
    if not data:
        return f'<div class="chart"><h4>{e(title)}</h4><p class="empty">none</p></div>'
    row, label_w = 22, 150
    top = max(data.values()) or 1
    h = row * len(data) + 10
    parts = [f'<svg width="{width}" height="{h}" role="img" aria-label="{e(title)}">']
    for i, (k, v) in enumerate(data.items()):
        y = 5 + i * row
        w = max(1.0, (width - label_w - 70) * v / top)
        parts.append(f'<text x="{label_w - 6}" y="{y + 15}" text-anchor="end">{e(str(k))[:24]}</text>'
                     f'<rect class="bar" x="{label_w}" y="{y + 3}" width="{w:.1f}" height="{row - 6}" '
                     f'fill="{PALETTE[i % len(PALETTE)]}"/>'
                     f'<text x="{label_w + w + 4:.1f}" y="{y + 15}">{_num(v)}{e(unit)}</text>')
    parts.append("</svg>")
    return f'<div class="chart"><h4>{e(title)}</h4>{"".join(parts)}</div>'


def _num(v: float) -> str:
    if isinstance(v, float) and not v.is_integer():
        return f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"
    v = int(v)
    return f"{v / 1e6:.2f}M" if v >= 10**6 else f"{v:,}"


def fractions_chart(stage: str, pools: dict[str, dict[str, Any]]) -> str:
    """Requested against achieved fraction per pool: paired bars."""
    e = html.escape
    row, label_w, width = 34, 110, 460
    h = row * len(pools) + 24
    parts = [f'<svg width="{width}" height="{h}" role="img" aria-label="fractions {e(stage)}">',
             '<rect x="300" y="2" width="10" height="10" fill="#999"/>'
             '<text x="314" y="11">requested</text>'
             '<rect x="380" y="2" width="10" height="10" fill="#109618"/>'
             '<text x="394" y="11">achieved</text>']
    for i, (pool, p) in enumerate(pools.items()):
        y = 20 + i * row
        span = width - label_w - 100
        req, ach = p["requested"], p["achieved"] or 0
        parts.append(
            f'<text x="{label_w - 6}" y="{y + 16}" text-anchor="end">{e(pool)}</text>'
            f'<rect class="bar" x="{label_w}" y="{y}" width="{max(1, span * req):.1f}" '
            f'height="12" fill="#999"/>'
            f'<rect class="bar" x="{label_w}" y="{y + 14}" width="{max(1, span * ach):.1f}" '
            f'height="12" fill="#109618"/>'
            f'<text x="{label_w + span * max(req, ach) + 4:.1f}" y="{y + 16}">'
            f'{req:.0%} / {ach:.1%}</text>')
    parts.append("</svg>")
    return "".join(parts)


CSS = """body{font-family:system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{margin-bottom:0}.sub{color:#666;margin-top:4px}section{background:#fff;border:1px solid #ddd;
border-radius:6px;padding:12px 16px;margin:16px 0}.grid{display:flex;flex-wrap:wrap;gap:12px}
.chart h4{margin:6px 0;font-size:13px;color:#444}svg text{font-size:11px;fill:#333}
table{border-collapse:collapse;font-size:13px}td,th{border-bottom:1px solid #eee;padding:3px 8px;
text-align:right}th:first-child,td:first-child{text-align:left}.empty{color:#999;font-size:12px}
.bad{color:#b00}.verdict{font-weight:bold;padding:1px 6px;border-radius:3px;color:#fff;
white-space:nowrap}.v-passed{background:#109618}.v-failed{background:#b00}.v-out{background:#e08a00}
.v-none{background:#999}.legend{font-size:11px;max-width:430px}.key{margin-right:8px;white-space:nowrap}
.key i{display:inline-block;width:10px;height:10px;margin-right:3px}td.wrap{text-align:left;
max-width:420px;white-space:normal}#validation th{text-align:left}
h2 .verdict{font-size:13px;vertical-align:middle;margin-left:8px}"""


_BADGE = {"passed": "v-passed", "failed": "v-failed", "out of date": "v-out"}


def verdict_badge(v: dict[str, Any] | None) -> str:
    status = (v or {}).get("status", "not validated")
    return f"<span class='verdict {_BADGE.get(status, 'v-none')}'>{html.escape(status)}</span>"


def render_verdicts(verdicts: dict[str, dict[str, Any]]) -> str:
    e = html.escape
    if not verdicts:
        return ""
    out = ["<section id='validation'><h2>Validation</h2><table><tr><th>stage</th><th>verdict</th>"
           "<th>samples</th><th>expectations</th><th>failed expectations</th>"
           "<th>quarantined shards</th><th>samples removed</th><th>Data Docs</th></tr>"]
    for stage, v in verdicts.items():
        docs = v.get("docs") or {}
        links = " ".join(f"<a href='{e(href)}'>{e(name)}</a>" for name, href in docs.items())
        when = f"<br><small>{e(str(v['validated_at']))}</small>" if v.get("validated_at") else ""
        n, x = v.get("samples"), v.get("expectations")
        out.append(
            f"<tr class='verdict-row' data-stage='{e(stage)}'><td>{e(stage)}</td>"
            f"<td class='wrap'>{verdict_badge(v)}{when}</td><td>{'-' if n is None else n}</td>"
            f"<td>{'-' if x is None else x}</td>"
            f"<td class='wrap'>{e(', '.join(v.get('failed') or [])) or '-'}</td>"
            f"<td class='wrap'>{e(', '.join(v.get('quarantined') or [])) or '-'}</td>"
            f"<td>{v.get('removed_samples', 0) or '-'}</td><td class='wrap'>{links or '-'}</td></tr>")
    out.append("</table><p class='sub'>not validated: no verdict yet (run <code>vita-corpus validate "
               "OUT</code>); out of date: the shards changed since the verdict.</p></section>")
    return "\n".join(out)


def render_html(rep: dict[str, Any], galleries: dict[str, str] | None = None,
                history_html: str = "", dupe_pairs: str = "") -> str:
    e = html.escape
    galleries = galleries or {}
    verdicts = rep.get("verdicts") or {}
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>data mix: {e(rep['corpus'])}"
           f"</title><style>{CSS}\n{GALLERY_CSS}</style></head><body>",
           f"<h1>Data mix: {e(rep['corpus'] or rep['out'])}</h1>",
           f"<p class='sub'>{e(rep['out'])} &middot; generated {e(rep['generated'])} &middot; "
           f"code {e(rep['code_version'])} &middot; accounting "
           f"{'<b>ok</b>' if rep.get('accounted') else '<b class=bad>FAILED or unknown</b>'}</p>"]
    st = rep["stages"]
    out.append(render_verdicts(verdicts))
    out.append("<section><h2>Stages</h2><table><tr><th>stage</th><th>samples</th><th>tokens</th>"
               "<th>audio h</th><th>spoken questions</th><th>shards</th><th>MB</th></tr>")
    for name, s in st.items():
        sf = s["speech_questions"]["spoken_fraction"]
        out.append(f"<tr><td>{e(name)}</td><td>{s['samples']:,}</td><td>{_num(s['tokens'])}</td>"
                   f"<td>{s['audio_hours']:.3f}</td><td>{'-' if sf is None else f'{sf:.1%}'}</td>"
                   f"<td>{s['shards']}</td><td>{s['shard_mb']['total']:.1f}</td></tr>")
    out.append("</table><div class='grid'>")
    out.append(bars("samples per stage", {k: v["samples"] for k, v in st.items()}))
    out.append(bars("tokens per stage", {k: v["tokens"] for k, v in st.items()}))
    out.append("</div></section>")
    out.append(history_html)
    if rep["recipes"]:
        out.append("<section><h2>Requested against achieved fractions</h2><div class='grid'>")
        for sid, r in rep["recipes"].items():
            speech = f" (speech {r['speech_fraction']:.0%})" if r["speech_fraction"] else ""
            out.append(f"<div class='chart'><h4>{e(sid)} {e(r['name'])}{speech}</h4>"
                       f"{fractions_chart(sid, r['pools'])}</div>")
        out.append("</div></section>")
    for name, s in st.items():
        badge = verdict_badge(verdicts[name]) if name in verdicts else ""
        out.append(f"<section id='{e(name)}'><h2>{e(name)}{badge}</h2><div class='grid'>")
        out.append(bars("samples by source", s["samples_by_source"]))
        out.append(bars("tokens by source", s["tokens_by_source"]))
        out.append(bars("samples by task", s["samples_by_task"]))
        out.append(bars("tokens by modality", s["tokens_by_modality"]))
        out.append(bars("tiles per image", s["tiles_per_image"]))
        out.append(bars("frames per video", s["frames_per_video"]))
        out.append(bars(f"audio duration ({s['audio_hours']:.3f} h)", s["audio_duration_hist"]))
        out.append(bars("languages", s["languages"]))
        out.append(bars("shard sizes", s["shard_size_hist"]))
        sq = s["speech_questions"]
        if sq["spoken"] or sq["typed"]:
            out.append(bars("questions", {"spoken": sq["spoken"], "typed": sq["typed"],
                                          **{f"kept: {k}": v for k, v in sq["kept_as_text"].items()}}))
        out.append("</div>")
        out.append(galleries.get(name, ""))
        out.append("</section>")
    rej = st.get("ingest", {}).get("rejects", {})
    out.append(render_dupes(rep.get("dedupe"), dupe_pairs))
    out.append("<section><h2>Rejects</h2><div class='grid'>")
    out.append(bars("rejects by reason", rep["rejects_by_reason"]))
    out.append(bars("rejects by source", {k: sum(v.values()) for k, v in rej.items()}))
    out.append(f"</div><p class='sub'>Every reject is a line in {e(REJECTS_DIR)}/ with its "
               "input and reason.</p></section></body></html>")
    return "\n".join(out)
