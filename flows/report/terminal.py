"""What the terminal shows after a command: the live per-source progress of a build, the build
summary and the validation verdicts, as tables that stay readable when narrow (tables.py).
"""
from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import Progress

from flows.report.tables import Col, print_table


class BuildProgress:
    """A row per source: inputs read, written, rejected; redrawn at most 10 times a second."""

    def __init__(self, progress: Progress) -> None:
        self.p = progress
        self.tasks: dict[str, Any] = {}
        self.last = 0.0

    def __call__(self, source: str, inputs: int, written: int, rejected: int,
                 final: bool) -> None:
        if source not in self.tasks:
            self.tasks[source] = self.p.add_task(source, total=None)
        now = time.monotonic()
        if now - self.last < 0.1 and not final:
            return
        self.last = now
        self.p.update(self.tasks[source], completed=inputs, total=inputs if final else None,
                      description=f"{source}: {written} written, {rejected} rejected")


    def stage(self, stage: str, written: int, planned: int, speech: dict[str, int],
              final: bool) -> None:
        """A stage's row: samples written of those planned so far, and its speech."""
        if stage not in self.tasks:
            self.tasks[stage] = self.p.add_task(stage, total=None)
        spoken = ""
        if speech.get("synthesized") or speech.get("cached"):
            spoken = (f", questions: {speech['synthesized']} synthesized, {speech['cached']} "
                      f"from the cache, {speech['kept_as_text']} kept as text")
        self.p.update(self.tasks[stage], completed=written, total=planned if final else None,
                      description=f"{stage}: {written} samples written{spoken}")


def print_build_summary(report: dict[str, Any], out: str) -> None:
    con = Console()
    rows = []
    for name, s in report["sources"].items():
        sp = s.get("speech_questions", {})
        spoken = f"{sp.get('spoken', 0)}/{sum(sp.values())}" if sp else "-"
        rows.append([name, s["kind"], str(s["inputs"]), str(s["written"]), str(s["rejected"]),
                     spoken, str(s["parts"]), str(s["parts_reused"]),
                     f"{s['shard_bytes'] / 2**20:.1f}"])
    tot = report["totals"]
    rows.append(["total", "", str(tot["inputs"]), str(tot["written"]), str(tot["rejected"]), "",
                 str(tot["parts"]), "", f"{tot['shard_bytes'] / 2**20:.1f}"])
    print_table(con, escape(f"build of {report['corpus']!r} into {out}/{report['stage']}"),
                [Col("source"), Col("kind")] + [Col(c, right=True) for c in (
                    "inputs", "written", "rejected", "spoken", "parts", "reused", "MB")],
                rows, bold_last=True)
    rej = [(reason, name, n) for name, s in report["sources"].items()
           for reason, n in s["reject_reasons"].items()]
    if rej:
        print_table(con, "rejects by reason", [Col("reason"), Col("source"), Col("count", True)],
                    [[reason, name, str(n)] for reason, name, n in sorted(rej)])
    ok = "[green]inputs == written + rejected for every source[/]" if report["accounted"] \
        else "[red]ACCOUNTING FAILED[/]"
    if report.get("stages"):
        rows = []
        for sid, v in report["stages"].items():
            pools = ", ".join(f"{p} {(x['achieved'] or 0):.0%}/{x['requested']:.0%}"
                              for p, x in v["pools"].items())
            rows.append([sid, v["name"], str(sum(x["selected"] for x in v["pools"].values())),
                         pools or "-", "reused" if v["reused"] else "built"])
        print_table(con, "stages (shards in OUT/stage_<id>)",
                    [Col("stage"), Col("name"), Col("samples", True),
                     Col("pools: achieved of requested"), Col("kept")], rows)
    tts = report.get("tts", {})
    if tts.get("synthesis_calls") or tts.get("cache_hits"):
        con.print(f"speech: {tts['synthesis_calls']} sentences synthesised, "
                  f"{tts['cache_hits']} from the cache")
    con.print(f"{ok}\ndata-mix report: {out}/report/index.html (and data_mix.json)\n"
              f"rejects: {out}/rejects/")


def print_verdicts(verdicts: dict[str, Any], out: str) -> bool:
    con = Console()
    rows = []
    for stage, v in verdicts.items():
        failed = ", ".join(f"{f['expectation']}({f['column'] or f['table']})" for f in v["failed"])
        removed = v.get("removed_samples") or {}
        by_reason = ", ".join(f"{k} {n}" for k, n in (removed.get("by_reason") or {}).items())
        rows.append([stage, "[green]pass[/]" if v["passed"] else "[red]FAIL[/]", str(v["samples"]),
                     str(len(v["shards"])), str(len(v["quarantined"])),
                     escape(by_reason) or "-", escape(failed) or "-"])
    print_table(con, "validation", [Col("stage"), Col("verdict"), Col("samples", True),
                                    Col("shards", True), Col("quarantined", True),
                                    Col("samples removed"), Col("failed expectations")], rows)
    if any((v.get("removed_samples") or {}).get("count") for v in verdicts.values()):
        con.print("samples that broke a per-sample rule were taken out of their shards (originals "
                  f"kept in {out}/validation/quarantine/, reject lines in {out}/rejects/<stage>/)")
    con.print(f"verdicts: {out}/validation/<stage>.verdict.json; Data Docs: "
              f"{out}/validation/gx/uncommitted/data_docs/local_site/index.html")
    return all(v["passed"] for v in verdicts.values())
