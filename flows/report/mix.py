"""The data-mix report: what a build produced, per stage, whether it passed validation, a few
samples of each stage, and how the figures moved over the last builds.

Figures are aggregated by streaming the per-shard manifests (plain JSON, no sample is opened),
so a build of millions of samples reports in seconds; the gallery then opens only the shards
of the few samples it shows (flows.report.gallery). The report is a JSON file with every figure and
an HTML page with inline SVG charts (no JavaScript, no network), both under OUT/report/, with
the gallery's media beside them in OUT/report/media/. Verdicts are read from
OUT/validation/<stage>.verdict.json; a stage without one is shown as "not validated", and one
whose shards changed since as "out of date".
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from datetime import UTC, datetime
from typing import Any

from flows.report.dupe_gallery import collect_pairs, render_pairs
from flows.report.gallery import MediaWriter, Picker, collect, render_gallery
from flows.report.history import history_path, load_history, record_build, record_validation, render_history
from flows.report.page import render_html
from storage import uri
from storage.verdict import VALIDATION_DIR

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
        "dedupe": build.get("dedupe"),
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
    dupe_pairs = render_pairs(collect_pairs(out, rep.get("dedupe"), media))
    media.prune()
    rep["gallery"] = {"seed": settings["seed"], "samples_per_stage": settings["gallery_samples"],
                      "rule": "crc32(seed|gallery|stage|key), best of each kind first",
                      "stages": shown_ids}
    rep["history"] = {"path": hist, "builds": len(builds)}
    uri.write_bytes_atomic(uri.join(report_dir, "data_mix.json"),
                           (json.dumps(rep, indent=1, ensure_ascii=False) + "\n").encode())
    page = render_html(rep, galleries, render_history(builds, hist), dupe_pairs)
    uri.write_bytes_atomic(uri.join(report_dir, "index.html"), page.encode())
    return rep


def refresh_after_validation(out: str, verdicts: dict[str, dict[str, Any]] | None = None
                             ) -> dict[str, Any]:
    """What follows a validation: its history row, Data Docs that open offline, and the
    report re-rendered with the verdicts (None: read from OUT/validation/*.verdict.json)."""
    from flows.report.datadocs import make_offline

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
