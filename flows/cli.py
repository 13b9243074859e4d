"""The `vita-corpus` command line: each command, its options and its messages.

It runs past 400 lines because every command and option is declared here, so that `--help`
and the code read in one place; the work each command starts lives in the sub-packages.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from flows.report.tables import Col, print_table
from flows.report.terminal import BuildProgress, print_build_summary, print_verdicts
from schemas.config import ConfigError, load_config
from schemas.rejects import REASONS

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Prepare VITA-1.5-style multimodal training corpora.")
console = Console(stderr=True)


ExecutorOpt = Annotated[str, typer.Option(
    "--executor", help="ray: Ray Data over all cores (local Ray, or --ray-address); local: in-process")]
RayAddressOpt = Annotated[Optional[str], typer.Option(  # noqa: UP045 - typer needs Optional
    "--ray-address", envvar="RAY_ADDRESS", help="a Ray cluster, e.g. ray://head:10001")]
NumCpusOpt = Annotated[Optional[int], typer.Option(  # noqa: UP045
    "--num-cpus", help="CPUs for the local Ray (default: all)")]
PartitionSizeOpt = Annotated[int, typer.Option(
    "--partition-size", min=1,
    help="inputs per partition task of the flow (rounded up to whole ranges of "
         "shard.max_samples inputs): a source's partitions run in parallel")]


WaitLockOpt = Annotated[float, typer.Option(
    "--wait-lock", min=0,
    help="seconds to wait for another process that holds OUT's lock (default: exit at once, "
         "with code 3, naming the holder)")]


@contextlib.contextmanager
def _holding(out: str, command: str, wait_s: float) -> Iterator[None]:
    """Hold OUT's lock (storage.lock) for the block; exit 3 naming the holder when another
    process has it."""
    from storage.lock import OutLocked, acquire, release

    try:
        acquire(out, command, wait_s)
    except OutLocked as err:
        console.print(f"[red]{escape(str(err))}[/]")
        raise typer.Exit(3) from None
    try:
        yield
    finally:
        release(out)


def _internal_errors(report: dict[str, Any], out: str) -> int:
    """Say how many inputs hit an internal error (they are rejects; all else was written)."""
    n = int(report.get("internal_errors") or 0)
    if n:
        console.print(f"[red]{n} input{'' if n == 1 else 's'} hit an internal error: rejected "
                      f"`internal_error` with the exception in {escape(out)}/rejects; everything "
                      "else was written. This is a bug or an input nobody foresaw: please report "
                      "it with the reject lines.[/]")
    return n


StagesOpt = Annotated[str, typer.Option(
    "--stages", help="stages to build from the ingest pool: all, none, or e.g. 1.1,2.2")]
RecipesOpt = Annotated[Optional[Path], typer.Option(  # noqa: UP045
    "--recipes", help="folder of stage_*.yaml recipes (default: the paper's)")]


def make_executor(kind: str, ray_address: str | None = None, num_cpus: int | None = None,
                  window: int = 2048) -> Any:
    """The executor named by --executor; Ray is imported only when it is asked for."""
    if kind == "local":
        from flows.build.executors import LocalExecutor

        return LocalExecutor()
    if kind == "ray":
        from flows.build.ray_exec import RayDataExecutor

        return RayDataExecutor(address=ray_address, num_cpus=num_cpus, window=window)
    raise ValueError(f"unknown executor {kind!r}; use 'ray' or 'local'")


def _run_build(config: Path, out: str, stage: str, overwrite: bool, quiet: bool,
               executor: str = "ray", ray_address: str | None = None,
               num_cpus: int | None = None, stages: str = "all",
               recipes: Path | None = None, validate: bool = True,
               wait_lock: float = 0.0) -> dict[str, Any]:
    from schemas.recipes import load_recipes, select_stages

    try:
        cfg = load_config(config)
        chosen = [] if stages == "none" else select_stages(load_recipes(recipes), stages)
    except ConfigError as err:
        console.print(f"[red]{err}[/]")
        raise typer.Exit(2) from None
    with _holding(out, "vita-corpus build", wait_lock):  # before Ray starts: a refusal is quick
        report = _build_and_validate(cfg, chosen, out, stage, overwrite, quiet, executor,
                                     ray_address, num_cpus, validate)
    if _internal_errors(report, out):
        raise typer.Exit(1)
    return report


def _build_and_validate(cfg: Any, chosen: list[Any], out: str, stage: str, overwrite: bool,
                        quiet: bool, executor: str, ray_address: str | None,
                        num_cpus: int | None, validate: bool) -> dict[str, Any]:
    from flows.build.pipeline import BuildError, build
    from schemas.manifest import AccountingError
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
                report = build(cfg, out, stage=stage, overwrite=overwrite, progress=BuildProgress(p),
                               executor=ex, stages=chosen)
    except (BuildError, AccountingError) as err:
        console.print(f"[red]build failed: {err}[/]")
        ex.close()
        raise typer.Exit(1) from None
    print_build_summary(report, out)
    try:
        if validate and chosen:
            console.print("validating the stages' shards (Great Expectations) ...")
            verdicts = _validate_with_progress(out, None, ex)
            _after_validation(out, verdicts)
            if not print_verdicts(verdicts, out):
                _internal_errors(report, out)
                raise typer.Exit(1)
    finally:
        ex.close()
    return report


def _validate_with_progress(out: str, stage: str | None, ex: Any) -> dict[str, Any]:
    """flows.validation.gate.validate with a live count of the shards and samples read per stage."""
    from flows.validation.gate import validate

    with Progress(TextColumn("validating {task.description}"),
                  TextColumn("{task.fields[shards]} shards"), TextColumn("{task.completed} samples"),
                  TimeElapsedColumn(), console=console, transient=True) as p:
        tasks: dict[str, Any] = {}

        def progress(name: str, shards: int, samples: int) -> None:
            if name not in tasks:
                tasks[name] = p.add_task(name, total=None, shards=0)
            p.update(tasks[name], completed=samples, shards=shards)

        return validate(out, stage, executor=ex, progress=progress)


def _after_validation(out: str, verdicts: dict[str, Any] | None) -> None:
    """The verdicts into the report and the history; the Data Docs made to open offline."""
    from flows.report.mix import refresh_after_validation

    refresh_after_validation(out, verdicts)


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
    wait_lock: WaitLockOpt = 0.0,
) -> None:
    """Ingest and transform the config's sources into OUT/ingest, then build the stages'
    shards (OUT/stage_<id>), the data-mix report (OUT/report) and validate the stages.

    Exit codes: 0 built (and validated); 1 the build failed, a stage failed validation, or
    inputs hit internal errors (everything else is written); 2 a bad config or option; 3
    another process is writing OUT."""
    _run_build(config, out, stage, overwrite, quiet, executor, ray_address, num_cpus, stages,
               recipes, validate, wait_lock)


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
    scale: Annotated[int, typer.Option(
        "--scale", min=0, help="instead of the small demo, N generated records (mostly text QA "
                               "and captions; flows/corpora/scale.py), to see how cost grows")] = 0,
    question_pool: Annotated[bool, typer.Option(
        "--question-pool", help="with --scale: questions from a pool of about twenty (a warm "
                                "synthesis cache then serves stage 2.2) instead of a different "
                                "one per record")] = False,
    plant: Annotated[bool, typer.Option(
        "--plant-duplicates", help="with --scale: plant duplicates, reworded answers, re-encoded "
                                   "images and benchmark questions (listed in "
                                   "OUT/inputs/planted.jsonl) and switch the content checks on")
    ] = False,
    wait_lock: WaitLockOpt = 0.0,
) -> None:
    """Generate a small corpus in every supported format under OUT/inputs and build it."""
    with _holding(out, "vita-corpus demo", wait_lock):
        _demo(out, overwrite, quiet, flow, executor, ray_address, num_cpus, stages, scale,
              question_pool, plant)


def _demo(out: str, overwrite: bool, quiet: bool, flow: bool, executor: str,
          ray_address: str | None, num_cpus: int | None, stages: str, scale: int,
          question_pool: bool = False, plant: bool = False) -> None:
    inputs = Path(out) / "inputs"
    console.print(f"generating {'demo' if not scale else f'{scale:,} scale'} inputs in "
                  f"{inputs} ...")
    if scale:
        from flows.corpora.scale import make_scale_inputs

        cfg_path = make_scale_inputs(inputs, scale, question_pool=question_pool, plant=plant)
    else:
        from flows.corpora.demo import make_demo_inputs

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
    from flows.report.mix import compare as diff
    from flows.report.mix import fmt_delta, load_report, write_report

    if not Path(out).exists() and "://" not in out:
        console.print(f"[red]{out} does not exist[/]")
        raise typer.Exit(2)
    rep = write_report(out) if refresh else load_report(out)
    con = Console()
    verdicts = rep.get("verdicts") or {}
    colour = {"passed": "green", "failed": "red", "out of date": "yellow"}
    rows = []
    for name, s in rep["stages"].items():
        sf = s["speech_questions"]["spoken_fraction"]
        v = verdicts.get(name)
        status = "-" if v is None else f"[{colour.get(v['status'], 'dim')}]{v['status']}[/]"
        rows.append([name, status, f"{s['samples']:,}", f"{s['tokens']:,}",
                     f"{s['audio_hours']:.3f}", "-" if sf is None else f"{sf:.1%}",
                     str(s["shards"]), f"{s['shard_mb']['total']:.1f}"])
    print_table(con, escape(f"data mix of {rep['corpus'] or out}"),
                [Col("stage"), Col("validation")] + [Col(c, right=True) for c in (
                    "samples", "tokens", "audio h", "spoken", "shards", "MB")], rows)
    if rep["recipes"]:
        print_table(con, "requested / achieved fraction of each pool", [Col("stage"), Col("pools")],
                    [[sid, ", ".join(f"{p} {v['requested']:.0%}/{(v['achieved'] or 0):.1%}"
                                     for p, v in r["pools"].items())]
                     for sid, r in rep["recipes"].items()])
    if rep["rejects_by_reason"]:
        con.print("rejects: " + ", ".join(f"{k} {v}" for k, v in rep["rejects_by_reason"].items()))
    con.print(f"HTML: {out}/report/index.html")
    if compare:
        other = write_report(compare) if refresh else load_report(compare)
        moved = diff(other, rep)
        if not moved:
            con.print("nothing moved between the two builds")
            return
        print_table(con, escape(f"what moved: {compare} -> {out}"),
                    [Col("stage"), Col("figure")] + [Col(c, right=True) for c in (
                        "before", "after", "change")],
                    [[stage, escape(fig), f"{before:,}", f"{after:,}", fmt_delta(before, after)]
                     for stage, fig, before, after in moved])


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
    wait_lock: WaitLockOpt = 0.0,
) -> None:
    """The build as a Prefect flow on Ray: a task per partition of a source's inputs (the
    transforms), then per source (its shards in input order), stage and validation.

    Prefect's ephemeral API unless PREFECT_API_URL points at a server (then the run is in
    its UI). Exit codes as for `build`."""
    with _holding(out, "vita-corpus run (flow)", wait_lock):  # the flow holds it too, nested
        from flows.prefect_server import start_in_background

        server = start_in_background()  # first: it takes seconds, and needs nothing below
        from flows.nightly import run_build_flow

        report = run_build_flow(str(config), out, ray_address=ray_address, num_cpus=num_cpus,
                                server=server,
                                stages=stages, recipes=str(recipes) if recipes else None,
                                run_validation=validate, partition_size=partition_size)
    print_build_summary(report, out)  # the flow refreshed the report after validating
    failed = not all(v["passed"] for v in report.get("validation", {}).values())
    if _internal_errors(report, out) or failed:
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


@app.command("export")
def export_cmd(
    out: Annotated[str, typer.Argument(help="a build's output folder")],
    dest: Annotated[Path, typer.Argument(help="folder to write the export to (new, or an earlier export)")],
    stage: Annotated[list[str], typer.Option("--stage", help="a stage to export, e.g. 2.2 (repeat "
                                             "it for several, or `all`)")],
    fmt: Annotated[str, typer.Option("--format", help="vita (VITA-1.5's layout) or llava")] = "vita",
    skip_validation: Annotated[bool, typer.Option(
        help="export shards WITHOUT a passing validation verdict (recorded in export.json)")] = False,
    fps: Annotated[Optional[int], typer.Option(min=1, help="frame rate of the videos made from "  # noqa: UP045
                                               "frames (vita: 3, llava: 1)")] = None,
    media_root: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        help="vita: the media folder (VITA's AudioFolder) that exports to merge share "
             "(default: DEST)")] = None,
    llava_version: Annotated[str, typer.Option(
        help="llava: 1.5 (one image, no video) or onevision (image lists, video)")] = "1.5",
    executor: ExecutorOpt = "ray",
    ray_address: RayAddressOpt = None,
    num_cpus: NumCpusOpt = None,
) -> None:
    """Write stages in VITA-1.5's own training layout (or LLaVA's), for their training scripts:
    records, media, the dataset config lines, and a config to read the export back."""
    from flows.export.media import ExportError
    from flows.export.stage import export_stage
    from flows.export.vita import check_vita_export

    if skip_validation:
        console.print("[bold red]!!! --skip-validation: exporting shards without a passing "
                      "validation verdict; export.json records it[/]")
    try:
        ex = make_executor(executor, ray_address=ray_address, num_cpus=num_cpus)
    except ValueError as err:
        console.print(f"[red]{err}[/]")
        raise typer.Exit(2) from None
    try:
        with Progress(TextColumn("exporting"), BarColumn(),
                      TextColumn("{task.completed}/{task.total} samples"), TimeElapsedColumn(),
                      console=console, transient=True) as p:
            bar = p.add_task("export", total=None)
            res = export_stage(out, stage, str(dest), fmt, skip_validation=skip_validation, fps=fps,
                               llava_version=llava_version,
                               media_root=str(media_root) if media_root else None, executor=ex,
                               progress=lambda done, total: p.update(bar, completed=done, total=total))
    except ExportError as err:
        console.print(f"[red]{escape(str(err))}[/]")
        raise typer.Exit(2) from None
    finally:
        ex.close()
    con = Console()
    print_table(con, escape(f"{res.stage} of {out} as {fmt} in {res.dest}"),
                [Col("stage/source"), Col("records", right=True)],
                [[escape(src), str(n)] for src, n in sorted(res.by_source.items())]
                + [["total", str(res.records)]], bold_last=True)
    for what, counts in (("skipped (see skipped.jsonl)", res.skipped),
                         ("adjusted (see the meta files)", res.adjusted)):
        if counts:
            con.print(f"{what}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
                      soft_wrap=True)
    for s, why in res.left_out.items():
        con.print(f"left out {s}: {why}", soft_wrap=True)
    if fmt == "vita":
        problems = check_vita_export(res.dest)
        for line in problems[:20]:
            con.print(f"[red]{escape(line)}[/]")
        if problems:
            raise typer.Exit(1)
        con.print(escape(f"VITA's config lines: {res.dest}/dataset_config.py (--dataset_use "
                         f"{' or '.join(res.data_config)}); read it back with `vita-corpus build -c "
                         f"{res.dest}/corpus.yaml -o OUT2 --stages none`"), soft_wrap=True)
    else:
        con.print(escape(f"LLaVA: --data_path {res.dest}/<stage>.json --image_folder {res.dest} "
                         f"--video_folder {res.dest}"), soft_wrap=True)


@app.command("validate")
def validate_cmd(
    out: Annotated[str, typer.Argument(help="a build's output folder")],
    stage: Annotated[Optional[str], typer.Option(  # noqa: UP045
        "--stage", help="one stage, e.g. 2.2 (default: every stage)")] = None,
    executor: ExecutorOpt = "local",
    ray_address: RayAddressOpt = None,
    num_cpus: NumCpusOpt = None,
    wait_lock: WaitLockOpt = 0.0,
) -> None:
    """Validate OUT's stage shards with Great Expectations; quarantine failing shards; exit 1
    when a stage fails (3 when another process is writing OUT)."""

    with _holding(out, "vita-corpus validate", wait_lock):
        ex = make_executor(executor, ray_address=ray_address, num_cpus=num_cpus)
        try:
            verdicts = _validate_with_progress(out, stage, ex)
        except ValueError as err:
            console.print(f"[red]{err}[/]")
            raise typer.Exit(2) from None
        finally:
            ex.close()
        _after_validation(out, verdicts)
    if not print_verdicts(verdicts, out):
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
    grad_accum: Annotated[Optional[int], typer.Option(  # noqa: UP045
        help="micro-batches per step per process (default 1; on --resume, what keeps the run's "
             "processes x micro-batches)")] = None,
    pack: Annotated[bool, typer.Option(
        help="pack samples into rows of up to --max-len tokens (--batch-size then counts rows)")] = False,
    fsdp: Annotated[bool, typer.Option(
        help="shard weights, gradients and optimizer state per block (FSDP2; DCP checkpoints)")] = False,
    activation_checkpointing: Annotated[bool, typer.Option(
        help="recompute each block's activations in backward (less memory, more compute)")] = False,
    memory_gb: Annotated[Optional[float], typer.Option(  # noqa: UP045
        help="device memory per process to plan for (default: the GPU's); a model whose weights, "
             "gradients and AdamW state exceed 70% of it is sharded (FSDP) over the processes, "
             "or refused on one")] = None,
) -> None:
    """Train one VITA-1.5 stage from validated shards (bf16 on a GPU; torchrun for DDP or --fsdp)."""
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
                            num_workers=num_workers, save_every=save_every, device=device,
                            grad_accum=grad_accum, pack=pack, fsdp=fsdp,
                            activation_checkpointing=activation_checkpointing, memory_gb=memory_gb)
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
