"""The data-mix report: what a build produced, per stage, whether it passed validation, a few
samples of each stage, and how the figures moved over the last builds.

Figures are aggregated by streaming the per-shard manifests (plain JSON, no sample is opened),
so a build of millions of samples reports in seconds; the gallery then opens only the shards
of the few samples it shows (flows.gallery). The report is a JSON file with every figure and
an HTML page with inline SVG charts (no JavaScript, no network), both under OUT/report/, with
the gallery's media beside them in OUT/report/media/. Verdicts are read from
OUT/validation/<stage>.verdict.json; a stage without one is shown as "not validated", and one
whose shards changed since as "out of date".
"""

from __future__ import annotations

import html
import json
import math
import os
from collections import Counter
from datetime import UTC, datetime
from typing import Any

from flows.gallery import CSS as GALLERY_CSS
from flows.gallery import MediaWriter, Picker, collect, render_gallery
from flows.history import history_path, load_history, record_build, record_validation, render_history
from storage import uri
from storage.parts import REJECTS_DIR

VALIDATION_DIR = "validation"
DEFAULT_GALLERY = 4

TILE_BINS = list(range(1, 15))
FRAME_BINS = list(range(1, 18))
AUDIO_EDGES = [0, 1, 2, 3, 5, 8, 12, 16, 20, 25, 30, 60]


def _modality(s: dict[str, Any]) -> str:
    if s.get("frames"):
        return "video"
    if s.get("tiles"):
        return "image+audio" if s.get("audio_s") else "image"
    if s.get("audio_s"):
        return "audio"
    return "text"


def _stage_dirs(out: str) -> list[str]:
    names = [n for n in uri.listdir(out) if n == "ingest" or n.startswith("stage_")]
    return sorted(names, key=lambda n: (n != "ingest", n))


def aggregate_stage(out: str, stage: str, picker: Picker | None = None) -> dict[str, Any]:
    """Every figure of one stage folder, streamed from its manifests (each sample is offered
    to `picker`, the gallery's, on the way). `_shas` (shard -> sha256) is for the verdict
    check and is not part of the report."""
    samples = Counter()
    tokens = Counter()
    by_task, by_mod, tok_task, tok_mod = Counter(), Counter(), Counter(), Counter()
    langs, tiles, frames, audio_bins = Counter(), Counter(), Counter(), Counter()
    shard_mb: list[float] = []
    rejects: dict[str, Counter[str]] = {}
    audio_s = 0.0
    spoken = typed = 0
    kept: Counter[str] = Counter()
    inputs = 0
    shas: dict[str, str | None] = {}
    folder = uri.join(out, stage)
    for name in uri.listdir(folder):
        if not name.endswith(".manifest.json"):
            continue
        m = json.loads(uri.read_bytes(uri.join(folder, name)))
        src = m["source"]
        inputs += m["input_end"] - m["input_start"]
        if m["shard"]:
            shard_mb.append(m["bytes"] / 2**20)
            shas[m["shard"]] = m.get("sha256")
        if m["rejected"]:
            rejects.setdefault(src, Counter()).update(m["reject_reasons"])
        for s in m["samples"]:
            mod = _modality(s)
            if picker is not None and m["shard"]:
                picker.offer(m["shard"], s, mod)
            samples[src] += 1
            tokens[src] += s.get("tokens", 0)
            by_task[s.get("task", "")] += 1
            tok_task[s.get("task", "")] += s.get("tokens", 0)
            by_mod[mod] += 1
            tok_mod[mod] += s.get("tokens", 0)
            langs[s.get("language", "und")] += 1
            for t in s.get("tiles", ()):
                tiles[t] += 1
            if s.get("frames"):
                frames[s["frames"]] += 1
            for d in s.get("audio_s", ()):
                audio_s += d
                audio_bins[next((i for i, e in enumerate(AUDIO_EDGES[1:]) if d < e),
                                len(AUDIO_EDGES) - 2)] += 1
            sp = s.get("speech")
            if sp:
                spoken += sp["spoken"]
                typed += sp["typed"]
                kept.update(sp["kept_as_text"])
    questions = spoken + typed + sum(kept.values())
    return {
        "samples": sum(samples.values()), "tokens": sum(tokens.values()), "inputs": inputs,
        "samples_by_source": dict(sorted(samples.items())),
        "tokens_by_source": dict(sorted(tokens.items())),
        "samples_by_task": dict(sorted(by_task.items())), "tokens_by_task": dict(sorted(tok_task.items())),
        "samples_by_modality": dict(sorted(by_mod.items())),
        "tokens_by_modality": dict(sorted(tok_mod.items())),
        "languages": dict(sorted(langs.items())),
        "tiles_per_image": {str(k): tiles[k] for k in sorted(tiles)},
        "frames_per_video": {str(k): frames[k] for k in sorted(frames)},
        "audio_hours": round(audio_s / 3600, 4),
        "audio_duration_hist": {f"{AUDIO_EDGES[i]}-{AUDIO_EDGES[i + 1]}s": audio_bins[i]
                                for i in range(len(AUDIO_EDGES) - 1) if audio_bins[i]},
        "speech_questions": {"spoken": spoken, "typed": typed, "kept_as_text": dict(kept),
                             "spoken_fraction": round(spoken / questions, 4) if questions else None},
        "shards": len(shard_mb), "shard_mb": {"min": round(min(shard_mb), 3) if shard_mb else 0,
                                              "max": round(max(shard_mb), 3) if shard_mb else 0,
                                              "total": round(sum(shard_mb), 3)},
        "shard_size_hist": _size_hist(shard_mb),
        "rejects": {k: dict(sorted(v.items())) for k, v in sorted(rejects.items())},
        "_shas": shas,
    }


def _size_hist(mb: list[float]) -> dict[str, int]:
    """Shards by size, in power-of-two MB bins (0.25 MB and below first)."""
    bins: Counter[float] = Counter()
    for v in mb:
        bins[max(0.25, 2 ** math.ceil(math.log2(max(v, 1e-9))))] += 1
    return {f"<= {k:g} MB": bins[k] for k in sorted(bins)}


def report_settings(out: str) -> dict[str, Any]:
    """The seed and `report` settings of the config OUT was built with (OUT/corpus.yaml)."""
    import yaml

    cfg: Any = {}
    path = uri.join(out, "corpus.yaml")
    if uri.exists(path):
        try:
            cfg = yaml.safe_load(uri.read_bytes(path)) or {}
        except yaml.YAMLError:
            cfg = {}
    cfg = cfg if isinstance(cfg, dict) else {}
    rep = cfg.get("report") if isinstance(cfg.get("report"), dict) else {}
    return {"seed": int(cfg.get("seed", 0) or 0), "history": rep.get("history"),
            "gallery_samples": int(rep.get("gallery_samples", DEFAULT_GALLERY))}


def make_report(out: str, pickers: dict[str, Picker] | None = None) -> dict[str, Any]:
    """Every figure of OUT, with the stages' verdicts. Given `pickers` (empty), a gallery
    picker per stage is added to it and fed while the manifests stream."""
    build = {}
    path = uri.join(out, "report", "build_report.json")
    if uri.exists(path):
        build = json.loads(uri.read_bytes(path))
    names = _stage_dirs(out)
    if pickers is not None:
        settings = report_settings(out)
        shown = [n for n in names if n != "ingest"] or names  # the pool only when alone
        pickers.update({n: Picker(settings["seed"], n, settings["gallery_samples"]) for n in shown})
    stages = {name: aggregate_stage(out, name, (pickers or {}).get(name)) for name in names}
    shas = {name: st.pop("_shas") for name, st in stages.items()}
    mix = {}
    for sid, st in (build.get("stages") or {}).items():
        mix[sid] = {"name": st["name"], "speech_fraction": st["speech_fraction"],
                    "trainable": st["trainable"], "pools": st["pools"]}
    rejects = sum((Counter({r: n}) for s in stages.get("ingest", {}).get("rejects", {}).values()
                   for r, n in s.items()), Counter())
    return {
        "corpus": build.get("corpus", ""), "out": out,
        "generated": datetime.now(UTC).isoformat(timespec="seconds"),
        "code_version": build.get("code_version", ""),
        "stages": stages, "recipes": mix,
        "rejects_by_reason": dict(sorted(rejects.items())),
        "accounted": build.get("accounted"),
        "verdicts": read_verdicts(out, [n for n in names if n != "ingest"], shas),
    }


def write_report(out: str, build: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write OUT/report/{data_mix.json,index.html} and the gallery's media; with `build` (the
    build report of the build that just finished), first append its row to the history."""
    settings = report_settings(out)
    pickers: dict[str, Picker] = {}
    rep = make_report(out, pickers)
    hist = history_path(out, settings["history"])
    if build is not None:
        record_build(out, build, rep, settings["history"])
    builds = load_history(hist, rep["corpus"] or None)
    report_dir = uri.join(out, "report")
    media = MediaWriter(report_dir)
    galleries, shown_ids = {}, {}
    for stage, picker in pickers.items():
        shown = collect(out, stage, picker.picks(), media)
        galleries[stage] = render_gallery(stage, shown, settings["seed"])
        shown_ids[stage] = [s.id for s in shown]
    media.prune()
    rep["gallery"] = {"seed": settings["seed"], "samples_per_stage": settings["gallery_samples"],
                      "rule": "crc32(seed|gallery|stage|key), best of each kind first",
                      "stages": shown_ids}
    rep["history"] = {"path": hist, "builds": len(builds)}
    uri.write_bytes_atomic(uri.join(report_dir, "data_mix.json"),
                           (json.dumps(rep, indent=1, ensure_ascii=False) + "\n").encode())
    page = render_html(rep, galleries, render_history(builds, hist))
    uri.write_bytes_atomic(uri.join(report_dir, "index.html"), page.encode())
    return rep


def refresh_after_validation(out: str, verdicts: dict[str, dict[str, Any]] | None = None
                             ) -> dict[str, Any]:
    """What follows a validation: its history row, Data Docs that open offline, and the
    report re-rendered with the verdicts (None: read from OUT/validation/*.verdict.json)."""
    from flows.datadocs import make_offline

    if verdicts is None:
        folder = uri.join(out, VALIDATION_DIR)
        verdicts = {n[: -len(".verdict.json")]: json.loads(uri.read_bytes(uri.join(folder, n)))
                    for n in uri.listdir(folder) if n.endswith(".verdict.json")}

    record_validation(out, verdicts, report_settings(out)["history"])
    if uri.is_local(out):
        make_offline(out)
    return write_report(out)


# --- verdicts ------------------------------------------------------------------------------

def _failed_label(f: Any) -> str:
    if isinstance(f, dict):
        where = f.get("column") or f.get("table") or ""
        return f"{f.get('expectation', '?')}({where})" if where else str(f.get("expectation", "?"))
    return str(f)


def _quarantined_name(q: Any) -> str:
    if isinstance(q, dict):
        return str(q.get("shard") or q.get("key") or q.get("id") or json.dumps(q)[:60])
    return str(q)


def docs_pages(out: str, stage: str, index: str | None) -> dict[str, str]:
    """The Data Docs of a stage, relative to OUT/report: its index and the newest validation
    page of each suite (samples, shards, mix, ...), found by the suite name in the file name."""
    if not uri.is_local(out):
        return {}
    # OUT's own site first: the verdict's path is absolute, and OUT may have been moved since.
    root = os.path.join(out, VALIDATION_DIR, "gx", "uncommitted", "data_docs", "local_site")
    if not os.path.isfile(os.path.join(root, "index.html")) and index and os.path.isfile(index):
        root = os.path.dirname(index)
    if not os.path.isfile(os.path.join(root, "index.html")):
        return {}
    report_dir = os.path.join(out, "report")
    links = {"index": os.path.relpath(os.path.join(root, "index.html"), report_dir)}
    newest: dict[str, tuple[str, str]] = {}
    for dirpath, _, files in os.walk(os.path.join(root, "validations")):
        for f in files:
            # GX names a validation page <batch>-<suite>.html; our suites are <stage>.<table>.
            head, sep, table = f[: -len(".html")].rpartition(".")
            if not f.endswith(".html") or not sep or not head.endswith(stage):
                continue
            full = os.path.join(dirpath, f)
            if table not in newest or full > newest[table][0]:
                newest[table] = (full, os.path.relpath(full, report_dir))
    links.update({t: rel for t, (_, rel) in sorted(newest.items())})
    return {k: v.replace(os.sep, "/") for k, v in links.items()}


def read_verdicts(out: str, stages: list[str], shas: dict[str, dict[str, str | None]]
                  ) -> dict[str, dict[str, Any]]:
    """Each stage's verdict as the report shows it. Fields other than `passed` may be missing
    (or new ones present): each is read only if it is there."""
    res: dict[str, dict[str, Any]] = {}
    for stage in stages:
        path = uri.join(out, VALIDATION_DIR, f"{stage}.verdict.json")
        if not uri.exists(path):
            res[stage] = {"status": "not validated", "passed": None}
            continue
        try:
            v = json.loads(uri.read_bytes(path))
        except ValueError:
            v = None
        if not isinstance(v, dict):
            res[stage] = {"status": "unreadable verdict", "passed": None}
            continue
        passed = bool(v.get("passed"))
        removed = v.get("removed_samples")
        entry = {
            "status": "passed" if passed else "failed", "passed": passed,
            "validated_at": v.get("validated_at"), "samples": v.get("samples"),
            "expectations": v.get("expectations"),
            "failed": [_failed_label(f) for f in v.get("failed") or []],
            "quarantined": [_quarantined_name(q) for q in v.get("quarantined") or []],
            "removed_samples": removed.get("count", 0) if isinstance(removed, dict) else 0,
            "docs": docs_pages(out, stage, v.get("data_docs")),
        }
        checked, disk = v.get("shards"), shas.get(stage, {})
        if isinstance(checked, dict):
            known = set(checked) | set(entry["quarantined"])
            if any(disk.get(k) != h for k, h in checked.items()) or any(k not in known for k in disk):
                entry["status"] = "out of date"  # the shards on disk are not the ones it checked
        res[stage] = entry
    return res


# --- HTML ----------------------------------------------------------------------------------

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
                history_html: str = "") -> str:
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
    out.append("<section><h2>Rejects</h2><div class='grid'>")
    out.append(bars("rejects by reason", rep["rejects_by_reason"]))
    out.append(bars("rejects by source", {k: sum(v.values()) for k, v in rej.items()}))
    out.append(f"</div><p class='sub'>Every reject is a line in {e(REJECTS_DIR)}/ with its "
               "input and reason.</p></section></body></html>")
    return "\n".join(out)


def compare(a: dict[str, Any], b: dict[str, Any]) -> list[tuple[str, str, float, float]]:
    """(stage, figure, before, after) for every figure that moved between two reports."""
    rows = []
    for stage in sorted(set(a["stages"]) | set(b["stages"])):
        sa, sb = a["stages"].get(stage, {}), b["stages"].get(stage, {})
        for key in ("samples", "tokens", "audio_hours", "shards"):
            va, vb = sa.get(key, 0), sb.get(key, 0)
            if va != vb:
                rows.append((stage, key, va, vb))
        for group in ("samples_by_source", "languages", "samples_by_task"):
            ga, gb = sa.get(group, {}), sb.get(group, {})
            for k in sorted(set(ga) | set(gb)):
                if ga.get(k, 0) != gb.get(k, 0):
                    rows.append((stage, f"{group.split('_by_')[-1] if '_by_' in group else group}:{k}",
                                 ga.get(k, 0), gb.get(k, 0)))
        fa = (sa.get("speech_questions") or {}).get("spoken_fraction")
        fb = (sb.get("speech_questions") or {}).get("spoken_fraction")
        if fa != fb:
            rows.append((stage, "spoken_fraction", fa or 0, fb or 0))
    ra, rb = a.get("rejects_by_reason", {}), b.get("rejects_by_reason", {})
    for k in sorted(set(ra) | set(rb)):
        if ra.get(k, 0) != rb.get(k, 0):
            rows.append(("rejects", k, ra.get(k, 0), rb.get(k, 0)))
    return rows


def load_report(out: str) -> dict[str, Any]:
    path = uri.join(out, "report", "data_mix.json")
    if not uri.exists(path):
        return write_report(out)
    return json.loads(uri.read_bytes(path))


def fmt_delta(before: float, after: float) -> str:
    d = after - before
    pct = f" ({d / before:+.1%})" if before and math.isfinite(d / before) else ""
    return f"{d:+,.4g}{pct}"
