"""The `vita-corpus` command line."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from schemas.config import ConfigError, load_config
from schemas.rejects import REASONS

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Prepare VITA-1.5-style multimodal training corpora.")
console = Console(stderr=True)


class _Progress:
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


def _summary(report: dict[str, Any], out: str) -> None:
    con = Console()
    t = Table(title=f"build of {report['corpus']!r} into {out}/{report['stage']}")
    t.add_column("source", no_wrap=True)
    t.add_column("kind", no_wrap=True)
    for col in ("inputs", "written", "rejected", "spoken", "parts", "reused", "MB"):
        t.add_column(col, justify="right", no_wrap=True)
    for name, s in report["sources"].items():
        sp = s.get("speech_questions", {})
        spoken = f"{sp.get('spoken', 0)}/{sum(sp.values())}" if sp else "-"
        t.add_row(name, s["kind"], str(s["inputs"]), str(s["written"]), str(s["rejected"]),
                  spoken, str(s["parts"]), str(s["parts_reused"]),
                  f"{s['shard_bytes'] / 2**20:.1f}")
    tot = report["totals"]
    t.add_row("total", "", str(tot["inputs"]), str(tot["written"]), str(tot["rejected"]), "",
              str(tot["parts"]), "", f"{tot['shard_bytes'] / 2**20:.1f}", style="bold")
    con.print(t)
    rows = [(reason, name, n) for name, s in report["sources"].items()
            for reason, n in s["reject_reasons"].items()]
    if rows:
        r = Table(title="rejects by reason")
        r.add_column("reason", no_wrap=True)
        r.add_column("source", no_wrap=True)
        r.add_column("count", justify="right")
        for reason, name, n in sorted(rows):
            r.add_row(reason, name, str(n))
        con.print(r)
    ok = "[green]inputs == written + rejected for every source[/]" if report["accounted"] \
        else "[red]ACCOUNTING FAILED[/]"
    if report.get("stages"):
        st = Table(title="stages (shards in OUT/stage_<id>)")
        for col in ("stage", "name", "samples", "pools: achieved of requested", "kept"):
            st.add_column(col, no_wrap=col != "pools: achieved of requested")
        for sid, v in report["stages"].items():
            pools = ", ".join(f"{p} {(x['achieved'] or 0):.0%}/{x['requested']:.0%}"
                              for p, x in v["pools"].items())
            st.add_row(sid, v["name"], str(sum(x["selected"] for x in v["pools"].values())),
                       pools or "-", "reused" if v["reused"] else "built")
        con.print(st)
    tts = report.get("tts", {})
    if tts.get("synthesis_calls") or tts.get("cache_hits"):
        con.print(f"speech: {tts['synthesis_calls']} sentences synthesised, "
                  f"{tts['cache_hits']} from the cache")
    con.print(f"{ok}\ndata-mix report: {out}/report/index.html (and data_mix.json)\n"
              f"rejects: {out}/rejects/")


ExecutorOpt = Annotated[str, typer.Option(
    "--executor", help="ray: Ray Data over all cores (local Ray, or --ray-address); local: in-process")]
RayAddressOpt = Annotated[Optional[str], typer.Option(  # noqa: UP045 - typer needs Optional
    "--ray-address", envvar="RAY_ADDRESS", help="a Ray cluster, e.g. ray://head:10001")]
NumCpusOpt = Annotated[Optional[int], typer.Option(  # noqa: UP045
    "--num-cpus", help="CPUs for the local Ray (default: all)")]
PartitionSizeOpt = Annotated[int, typer.Option(
    "--partition-size", min=1,
    help="inputs per transform task of the flow: a source's partitions run in parallel")]


StagesOpt = Annotated[str, typer.Option(
    "--stages", help="stages to build from the ingest pool: all, none, or e.g. 1.1,2.2")]
RecipesOpt = Annotated[Optional[Path], typer.Option(  # noqa: UP045
    "--recipes", help="folder of stage_*.yaml recipes (default: the paper's)")]


def _run_build(config: Path, out: str, stage: str, overwrite: bool, quiet: bool,
               executor: str = "ray", ray_address: str | None = None,
               num_cpus: int | None = None, stages: str = "all",
               recipes: Path | None = None, validate: bool = True) -> dict[str, Any]:
    from flows.build import BuildError, build
    from flows.executors import make_executor
    from schemas.manifest import AccountingError
    from schemas.recipes import load_recipes, select_stages

    try:
        cfg = load_config(config)
        chosen = [] if stages == "none" else select_stages(load_recipes(recipes), stages)
    except ConfigError as err:
        console.print(f"[red]{err}[/]")
        raise typer.Exit(2) from None
    if executor == "ray":
        console.print("starting Ray" + (f" at {ray_address}" if ray_address else " (local)") + " ...")
    try:
        ex = make_executor(executor, ray_address=ray_address, num_cpus=num_cpus)
    except ValueError as err:
        console.print(f"[red]{err}[/]")
        raise typer.Exit(2) from None
    try:
        if quiet:
            report = build(cfg, out, stage=stage, overwrite=overwrite, executor=ex,
                           stages=chosen)
        else:
            with Progress(TextColumn("{task.description}"), BarColumn(),
                          TextColumn("{task.completed} inputs"), TimeElapsedColumn(),
                          console=console, transient=False) as p:
                report = build(cfg, out, stage=stage, overwrite=overwrite, progress=_Progress(p),
                               executor=ex, stages=chosen)
    except (BuildError, AccountingError) as err:
        console.print(f"[red]build failed: {err}[/]")
        ex.close()
        raise typer.Exit(1) from None
    _summary(report, out)
    try:
        if validate and chosen:
            from flows.validate import validate as run_validation

            console.print("validating the stages' shards (Great Expectations) ...")
            verdicts = run_validation(out, executor=ex)
            if not _verdicts(verdicts, out):
                raise typer.Exit(1)
    finally:
        ex.close()
    return report


def _verdicts(verdicts: dict[str, Any], out: str) -> bool:
    con = Console()
    t = Table(title="validation")
    for col in ("stage", "verdict", "samples", "shards", "quarantined", "failed expectations"):
        t.add_column(col, no_wrap=col != "failed expectations")
    for stage, v in verdicts.items():
        failed = ", ".join(f"{f['expectation']}({f['column'] or f['table']})" for f in v["failed"])
        t.add_row(stage, "[green]pass[/]" if v["passed"] else "[red]FAIL[/]", str(v["samples"]),
                  str(len(v["shards"])), str(len(v["quarantined"])), failed or "-")
    con.print(t)
    con.print(f"verdicts: {out}/validation/<stage>.verdict.json; Data Docs: "
              f"{out}/validation/gx/uncommitted/data_docs/local_site/index.html")
    return all(v["passed"] for v in verdicts.values())


@app.command()
def build(
    config: Annotated[Path, typer.Option("--config", "-c", help="corpus config (YAML)")],
    out: Annotated[str, typer.Option("--out", "-o", help="output folder or URI (s3://...)")],
    stage: Annotated[str, typer.Option(help="output sub-folder for the shards")] = "ingest",
    overwrite: Annotated[bool, typer.Option(help="rebuild sources whose config changed")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress display")] = False,
    executor: ExecutorOpt = "ray",
    ray_address: RayAddressOpt = None,
    num_cpus: NumCpusOpt = None,
    stages: StagesOpt = "all",
    recipes: RecipesOpt = None,
    validate: Annotated[bool, typer.Option(help="validate the stages after writing")] = True,
) -> None:
    """Ingest and transform the config's sources into OUT/ingest, then build the stages'
    shards (OUT/stage_<id>), the data-mix report (OUT/report) and validate the stages."""
    _run_build(config, out, stage, overwrite, quiet, executor, ray_address, num_cpus, stages,
               recipes, validate)


@app.command()
def demo(
    out: Annotated[str, typer.Option("--out", "-o", help="output folder")] = "demo_out",
    overwrite: Annotated[bool, typer.Option(help="rebuild even if the config changed")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
    flow: Annotated[bool, typer.Option(
        "--flow/--no-flow", help="run the build as the Prefect flow (tasks on a local Ray)")] = False,
    executor: ExecutorOpt = "ray",
    ray_address: RayAddressOpt = None,
    num_cpus: NumCpusOpt = None,
    stages: StagesOpt = "all",
) -> None:
    """Generate a small corpus in every supported format under OUT/inputs and build it."""
    from flows.demo import make_demo_inputs

    inputs = Path(out) / "inputs"
    console.print(f"generating demo inputs in {inputs} ...")
    cfg_path = make_demo_inputs(inputs)
    if flow:
        run(cfg_path, out, stages=stages, recipes=None, validate=True, ray_address=ray_address,
            num_cpus=num_cpus)
        return
    _run_build(cfg_path, out, "ingest", overwrite, quiet, executor, ray_address, num_cpus,
               stages)


@app.command()
def report(
    out: Annotated[str, typer.Argument(help="a build's output folder")],
    compare: Annotated[Optional[str], typer.Option(  # noqa: UP045
        "--compare", help="another build's OUT: show what moved")] = None,
    refresh: Annotated[bool, typer.Option(help="re-aggregate from the manifests")] = False,
) -> None:
    """Print the data-mix summary of OUT (the HTML is OUT/report/index.html)."""
    from flows.report import compare as diff
    from flows.report import fmt_delta, load_report, write_report

    if not Path(out).exists() and "://" not in out:
        console.print(f"[red]{out} does not exist[/]")
        raise typer.Exit(2)
    rep = write_report(out) if refresh else load_report(out)
    con = Console()
    t = Table(title=f"data mix of {rep['corpus'] or out}")
    for col in ("stage", "samples", "tokens", "audio h", "spoken", "shards", "MB"):
        t.add_column(col, justify="left" if col == "stage" else "right", no_wrap=True)
    for name, s in rep["stages"].items():
        sf = s["speech_questions"]["spoken_fraction"]
        t.add_row(name, f"{s['samples']:,}", f"{s['tokens']:,}", f"{s['audio_hours']:.3f}",
                  "-" if sf is None else f"{sf:.1%}", str(s["shards"]),
                  f"{s['shard_mb']['total']:.1f}")
    con.print(t)
    if rep["recipes"]:
        f = Table(title="requested / achieved fraction of each pool")
        f.add_column("stage", no_wrap=True)
        f.add_column("pools")
        for sid, r in rep["recipes"].items():
            f.add_row(sid, ", ".join(f"{p} {v['requested']:.0%}/{(v['achieved'] or 0):.1%}"
                                     for p, v in r["pools"].items()))
        con.print(f)
    if rep["rejects_by_reason"]:
        con.print("rejects: " + ", ".join(f"{k} {v}" for k, v in rep["rejects_by_reason"].items()))
    con.print(f"HTML: {out}/report/index.html")
    if compare:
        other = write_report(compare) if refresh else load_report(compare)
        rows = diff(other, rep)
        c = Table(title=f"what moved: {compare} -> {out}")
        for col in ("stage", "figure", "before", "after", "change"):
            c.add_column(col, justify="left" if col in ("stage", "figure") else "right")
        for stage, fig, before, after in rows:
            c.add_row(stage, fig, f"{before:,}", f"{after:,}", fmt_delta(before, after))
        con.print(c if rows else "nothing moved between the two builds")


@app.command()
def run(
    config: Annotated[Path, typer.Option("--config", "-c", help="corpus config (YAML)")],
    out: Annotated[str, typer.Option("--out", "-o", help="output folder")],
    stages: StagesOpt = "all",
    recipes: RecipesOpt = None,
    validate: Annotated[bool, typer.Option(help="validate the stages after writing")] = True,
    ray_address: RayAddressOpt = None,
    num_cpus: NumCpusOpt = None,
    partition_size: PartitionSizeOpt = 500,
) -> None:
    """The build as a Prefect flow on Ray: a task per partition of a source's inputs (the
    transforms), then per source (its shards in input order), stage and validation.

    Prefect's ephemeral API unless PREFECT_API_URL points at a server (then the run is in
    its UI)."""
    from flows.prefect_server import start_in_background

    server = start_in_background()  # first: it takes seconds, and needs nothing below
    from flows.nightly import run_build_flow

    report = run_build_flow(str(config), out, ray_address=ray_address, num_cpus=num_cpus,
                            server=server,
                            stages=stages, recipes=str(recipes) if recipes else None,
                            run_validation=validate, partition_size=partition_size)
    _summary(report, out)
    if not all(v["passed"] for v in report.get("validation", {}).values()):
        raise typer.Exit(1)


@app.command()
def schedule(
    config: Annotated[Path, typer.Option("--config", "-c", help="corpus config (YAML)")],
    out: Annotated[str, typer.Option("--out", "-o", help="output folder")],
    cron: Annotated[str, typer.Option(help="when to run, e.g. '0 2 * * *' (02:00 daily)")],
    name: Annotated[str, typer.Option(help="deployment name")] = "nightly",
    stages: StagesOpt = "all",
    ray_address: RayAddressOpt = None,
    partition_size: PartitionSizeOpt = 500,
) -> None:
    """Create a deployment with a cron schedule on the Prefect server (PREFECT_API_URL) and
    serve it: keep this running, and the nightly builds run here, visible in the UI."""
    import os

    from flows.nightly import serve_nightly

    if not os.environ.get("PREFECT_API_URL"):
        console.print("[yellow]PREFECT_API_URL is not set: start `prefect server start` and "
                      "export PREFECT_API_URL=http://127.0.0.1:4200/api so runs persist[/]")
    serve_nightly(str(config), out, cron, name=name, ray_address=ray_address, stages=stages,
                  partition_size=partition_size)


@app.command("validate")
def validate_cmd(
    out: Annotated[str, typer.Argument(help="a build's output folder")],
    stage: Annotated[Optional[str], typer.Option(  # noqa: UP045
        "--stage", help="one stage, e.g. 2.2 (default: every stage)")] = None,
    executor: ExecutorOpt = "local",
    ray_address: RayAddressOpt = None,
    num_cpus: NumCpusOpt = None,
) -> None:
    """Validate OUT's stage shards with Great Expectations; quarantine failing shards; exit 1
    when a stage fails."""
    from flows.executors import make_executor
    from flows.validate import validate

    ex = make_executor(executor, ray_address=ray_address, num_cpus=num_cpus)
    try:
        verdicts = validate(out, stage, executor=ex)
    except ValueError as err:
        console.print(f"[red]{err}[/]")
        raise typer.Exit(2) from None
    finally:
        ex.close()
    if not _verdicts(verdicts, out):
        raise typer.Exit(1)


@app.command("train")
def train_cmd(
    stage: Annotated[str, typer.Option(help="sub-stage: 1.1 1.2 1.3 2.1a 2.1b 2.2 3.1 3.2")],
    shards: Annotated[Path, typer.Option(help="the stage's shard folder, e.g. OUT/stage_2.2")],
    out: Annotated[Path, typer.Option("--out", "-o", help="run folder for checkpoints and metrics")],
    steps: Annotated[int, typer.Option(help="optimizer steps in total")] = 100,
    init: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        help="run folder of the previous stage to start from")] = None,
    resume: Annotated[bool, typer.Option(help="continue the run in --out from its last checkpoint")] = False,
    device: Annotated[str, typer.Option(help="auto, cuda or cpu")] = "auto",
    batch_size: Annotated[int, typer.Option(help="samples per step per process")] = 4,
    max_len: Annotated[int, typer.Option(help="longest token sequence")] = 4096,
    lr: Annotated[float, typer.Option(help="learning rate")] = 1e-3,
    warmup_steps: Annotated[int, typer.Option(help="linear warmup steps")] = 0,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay")] = 0.0,
    seed: Annotated[int, typer.Option(help="seed for weights, shard order and shuffling")] = 0,
    num_workers: Annotated[Optional[int], typer.Option(  # noqa: UP045
        help="DataLoader workers decoding media (default: 0 on a CPU, up to 4 on a GPU)")] = None,
    save_every: Annotated[int, typer.Option(help="checkpoint every N steps (0: at the end)")] = 500,
    model_config: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        help="model settings (YAML; `preset: paper` for the paper's shapes)")] = None,
    recipes: RecipesOpt = None,
    from_scratch: Annotated[bool, typer.Option(
        help="start a later stage from fresh weights instead of --init")] = False,
    skip_validation: Annotated[bool, typer.Option(
        help="train on shards WITHOUT a passing validation verdict (recorded in the run)")] = False,
    flow: Annotated[bool, typer.Option(help="run as a Prefect flow that waits for the verdict")] = False,
    wait: Annotated[float, typer.Option(help="with --flow: seconds to wait for the verdict")] = 0.0,
) -> None:
    """Train one VITA-1.5 stage from validated shards (bf16 on a GPU; torchrun for DDP)."""
    import logging

    from training.config import ModelConfig, RunConfig, TrainConfigError
    from training.data import NoShards
    from training.loop import TrainingRefused, train

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if skip_validation:
        console.print("[bold red]!!! --skip-validation: these shards have no passing validation "
                      "verdict checked; the run records it[/]")
    try:
        run_cfg = RunConfig(stage=stage, steps=steps, batch_size=batch_size, max_len=max_len, lr=lr,
                            warmup_steps=warmup_steps, weight_decay=weight_decay, seed=seed,
                            num_workers=num_workers, save_every=save_every, device=device)
        mcfg = ModelConfig.load(model_config) if model_config else None
        if flow:
            from flows.train_flow import train_flow

            if skip_validation:
                raise TrainingRefused("--flow waits for a passing verdict; it cannot --skip-validation")
            settings = {"run": {k: v for k, v in run_cfg.to_dict().items() if k != "stage"},
                        "model_config": str(model_config) if model_config else None,
                        "init": str(init) if init else None, "resume": resume,
                        "from_scratch": from_scratch, "recipes": str(recipes) if recipes else None}
            summary = train_flow(stage, str(shards), str(out), settings, wait_timeout_s=wait,
                                 poll_s=min(30.0, max(1.0, wait / 20)))
        else:
            summary = train(shards, out, run_cfg, mcfg, init=init, resume=resume,
                            skip_validation=skip_validation, from_scratch=from_scratch,
                            recipes=recipes)
    except (TrainingRefused, TrainConfigError, NoShards, ConfigError) as err:
        console.print(f"[red]{err}[/]")
        raise typer.Exit(2) from None
    final = summary.get("final", {})
    loss = final.get("loss", float("nan"))
    console.print(f"stage {stage}: {summary['steps']} steps, final loss {loss:.4f}, "
                  f"data wait {100 * summary['data_wait_frac']:.1f}% of step time, "
                  f"{summary['skipped_samples']} samples skipped; run folder {out}")


@app.command()
def recipes(
    out: Annotated[Path, typer.Option("--out", "-o", help="folder to write stage_*.yaml to")],
) -> None:
    """Write the default stage recipes (the paper's data mix) as YAML files to edit."""
    from schemas.recipes import write_recipes

    for p in write_recipes(out):
        Console().print(str(p))


@app.command()
def reasons() -> None:
    """List the reject reason slugs and what they mean."""
    t = Table("reason", "meaning")
    for k, v in REASONS.items():
        t.add_row(k, v)
    Console().print(t)


def main() -> None:  # pragma: no cover - console entry for `python -m flows.cli`
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
