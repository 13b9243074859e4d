"""The report's "Duplicates" section: the media cache's hit rate, duplicates per pair of
sources, leaks per benchmark, the largest clusters and near-duplicate image pairs (from the
build report's `dedupe` entry, flows.build.content), and a few pairs side by side."""

from __future__ import annotations

import html
from typing import Any


def _matrix(title: str, m: dict[str, dict[str, int]]) -> str:
    e = html.escape
    cols = sorted({c for row in m.values() for c in row})
    out = [f"<h4>{e(title)}</h4><table><tr><th>kept in \\ rejected from</th>"
           + "".join(f"<th>{e(c)}</th>" for c in cols) + "</tr>"]
    for r in sorted(m):
        out.append(f"<tr><td>{e(r)}</td>" + "".join(
            f"<td>{m[r].get(c, 0):,}</td>" for c in cols) + "</tr>")
    out.append("</table>")
    return "".join(out)


def render_dupes(d: dict[str, Any] | None, pairs_html: str = "") -> str:
    """The section; `pairs_html`: near-duplicate pairs side by side (flows.report.dupe_gallery)."""
    if not d:
        return ""
    e = html.escape
    out = ["<section id='duplicates'><h2>Duplicates</h2>"]
    mc = d.get("media_cache") or {}
    if mc.get("enabled"):
        rate = "-" if mc.get("hit_rate") is None else f"{mc['hit_rate']:.1%}"
        out.append(f"<p>Media cache: {mc['hits']:,} hits, {mc['misses']:,} misses "
                   f"(hit rate {rate}).</p>")
    for kind, m in (d.get("matrix") or {}).items():
        out.append(_matrix(kind, m))
    if d.get("benchmarks") is not None and d.get("settings", {}).get("benchmarks"):
        out.append("<h4>eval_contamination per benchmark</h4><table><tr><th>benchmark</th>"
                   "<th>samples rejected</th><th>by source</th></tr>")
        for b in d["settings"]["benchmarks"]:
            by = d["benchmarks"].get(b, {})
            out.append(f"<tr><td>{e(b)}</td><td>{sum(by.values()):,}</td><td>"
                       + ", ".join(f"{e(s)}: {n:,}" for s, n in by.items()) + "</td></tr>")
        out.append("</table>")
    if d.get("clusters"):
        out.append("<h4>Largest clusters (kept sample beside the others)</h4><table><tr>"
                   "<th>kind</th><th>size</th><th>kept</th><th>others (score, action)</th></tr>")
        for c in d["clusters"]:
            k = c["kept"]
            others = "<br>".join(f"{e(m['source'])}/{e(m['id'])} ({m['score']}, {e(m['action'])})"
                                 for m in c["members"])
            out.append(f"<tr><td>{e(c['kind'])}</td><td>{c['size']:,}</td>"
                       f"<td>{e(k['source'])}/{e(k['id'])}</td><td>{others}</td></tr>")
        out.append("</table>")
    ni = d.get("near_image")
    if ni:
        left = " left after the planner's rejects" if ni.get("action") == "reject" else ""
        out.append(f"<h4>Near-duplicate images (pHash, at most {ni['max_distance']} bits apart; "
                   f"{e(ni.get('action', 'report'))})</h4><p>{ni['pairs']:,} pairs{left} among "
                   f"{ni['distinct_images']:,} distinct images.</p>")
        if ni["matrix"]:
            out.append(_matrix("image pairs", ni["matrix"]))
        if ni["examples"]:
            out.append("<table><tr><th>first seen</th><th>near it</th><th>bits apart</th></tr>")
            for x in ni["examples"]:
                out.append(f"<tr><td>{e(x['kept']['source'])}/{e(x['kept']['id'])}</td>"
                           f"<td>{e(x['other']['source'])}/{e(x['other']['id'])}</td>"
                           f"<td>{x['distance']}</td></tr>")
            out.append("</table>")
    out.append(pairs_html)
    out.append("</section>")
    return "\n".join(out)
