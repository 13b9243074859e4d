"""One training loop for every stage: load the start point, freeze by plan, step, checkpoint.

`train(...)` refuses shards without a passing validation verdict that matches their current
checksums (unless told to skip, which it says loudly), starts from the previous stage's run
folder (or, for 1.1, from fresh weights / a local Qwen2 folder), trains exactly the modules the
stage's recipe names, and writes a run folder (see training.checkpoint). On a GPU it runs in
bf16 autocast; under `torchrun` each process is a DDP rank reading its own part of the shards.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from training import checkpoint as ckpt
from training.config import ModelConfig, RunConfig, TrainConfigError
from training.data import LoaderSettings, StageLoader, list_shards
from training.model import VitaModel
from training.stages import StagePlan, plan_for
from training.template import SPECIAL, ChatTemplate, load_tokenizer, train_tokenizer

log = logging.getLogger("vita_corpus.training")


class TrainingRefused(RuntimeError):
    """The run cannot start as asked; the message says what to do."""


def check_verdict(shards: Path, stage: str, skip: bool) -> dict[str, Any]:
    from flows.validate import ValidationRequired, require_verdict

    if skip:
        log.warning("!!! --skip-validation: training on %s WITHOUT a validation verdict; the run "
                    "records that it trained on unvalidated shards", shards)
        return {"skipped": True, "passed": None}
    folder = shards.resolve()
    if folder.name != f"stage_{stage}":
        raise TrainingRefused(f"{shards} is not the folder of stage {stage} (expected OUT/stage_{stage})")
    try:
        return require_verdict(str(folder.parent), stage)
    except ValidationRequired as err:
        raise TrainingRefused(f"{err}. Training refuses unvalidated shards (--skip-validation "
                              "overrides, loudly).") from None


def _texts(shards: list[str]) -> list[str]:
    import webdataset as wds

    out = []
    for s in wds.tarfile_to_samples(handler=wds.ignore_and_continue)(iter([{"url": u} for u in shards])):
        if "json" in s:
            rec = json.loads(s["json"])
            out += [t["value"] for t in rec.get("conversations", [])]
            target = (rec.get("meta") or {}).get("speech_target") or {}
            out += [target["text"]] if target.get("text") else []
    return out


def build_start(run: Path, plan: StagePlan, shards: list[str], cfg: ModelConfig | None,
                init: Path | None, tokenizer: Tokenizer | None = None
                ) -> tuple[VitaModel, Tokenizer, ModelConfig, dict[str, Any]]:
    """The model and tokenizer this stage starts from, and what they came from."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if init is not None:
        prev = ckpt.latest(init)
        if prev is None:
            raise TrainingRefused(f"{init} holds no finished checkpoint (no {init}/latest); train "
                                  f"stage {plan.previous} into it first")
        meta = ckpt.read_json(init / "config.json")
        if meta["stage"] not in (plan.previous, plan.stage):
            log.warning("stage %s usually starts from stage %s; %s is a stage %s run",
                        plan.stage, plan.previous, init, meta["stage"])
        if cfg is not None and cfg.to_dict() != meta["model"]:
            raise TrainingRefused(f"--model-config differs from the config of {init}; a stage "
                                  "continues with its previous stage's shapes")
        cfg = ModelConfig.from_dict(meta["model"])
        tok = Tokenizer.from_file(str(init / "tokenizer.json"))
        llm = Qwen2ForCausalLM(Qwen2Config(**meta["llm_config"]))
        model = VitaModel(cfg, tok.get_vocab_size(), _special(tok), llm=llm)
        ckpt.load_weights(model, prev)
        return model, tok, cfg, {"init": str(init), "init_checkpoint": str(prev),
                                 "init_stage": meta["stage"]}
    cfg = cfg or ModelConfig()
    llm = None
    if tokenizer is not None:
        tok = tokenizer
        source = "byte-level BPE trained on the stage's text (by rank 0)"
    elif cfg.tokenizer_path or cfg.llm_path:
        tok = load_tokenizer(cfg.tokenizer_path or cfg.llm_path)
        source = f"tokenizer from {cfg.tokenizer_path or cfg.llm_path}"
    else:
        tok = train_tokenizer(_texts(shards), cfg.bpe_vocab_size)
        source = f"byte-level BPE ({tok.get_vocab_size()} tokens) trained on the stage's text"
    if cfg.llm_path:
        # fp32 master weights: AdamW on bf16 weights loses most small updates (autocast gives
        # the bf16 speed on a GPU)
        llm = Qwen2ForCausalLM.from_pretrained(cfg.llm_path, local_files_only=True, dtype=torch.float32)
        llm.resize_token_embeddings(tok.get_vocab_size())
        if llm.config.hidden_size != cfg.llm_hidden:
            raise TrainConfigError(f"llm_hidden {cfg.llm_hidden} differs from the hidden size "
                                   f"{llm.config.hidden_size} of {cfg.llm_path}; set llm_hidden to it")
    model = VitaModel(cfg, tok.get_vocab_size(), _special(tok), llm=llm)
    return model, tok, cfg, {"init": None, "tokenizer": source, "llm_path": cfg.llm_path}


def _special(tok: Tokenizer) -> dict[str, int]:
    return {s: tok.token_to_id(s) for s in SPECIAL}


def freeze(model: VitaModel, plan: StagePlan) -> list[torch.nn.Parameter]:
    names = dict(model.named_children())
    missing = [m for m in plan.trainable if m not in names]
    if missing:
        raise TrainConfigError(f"stage {plan.stage} trains {missing}, which the model lacks")
    for name, child in names.items():
        child.requires_grad_(name in plan.trainable)
    return [p for p in model.parameters() if p.requires_grad]


# Settings that decide which samples each step sees; a resume must keep them.
_DATA_SETTINGS = ("batch_size", "max_len", "seed", "shuffle_buffer")


def _check_resume(meta: dict[str, Any], state: dict[str, Any], run_cfg: RunConfig, world: int) -> None:
    saved = meta["run"]
    changed = [f"{k}: {saved[k]} -> {getattr(run_cfg, k)}" for k in _DATA_SETTINGS
               if saved.get(k) != getattr(run_cfg, k)]
    if meta.get("world_size", 1) != world:
        changed.append(f"processes: {meta.get('world_size', 1)} -> {world}")
    if changed:
        raise TrainingRefused("--resume with other data settings would replay or skip samples ("
                              + "; ".join(changed) + "); resume with the run's own settings "
                              "(see its config.json)")
    if state.get("workers") is not None and run_cfg.num_workers is not None \
            and state["workers"] != run_cfg.num_workers:
        raise TrainingRefused(f"--resume with --num-workers {run_cfg.num_workers}, but the run used "
                              f"{state['workers']} (its loader position is per worker)")


@contextlib.contextmanager
def _oom_message(batch: dict[str, Any]):
    try:
        yield
    except torch.cuda.OutOfMemoryError as err:
        shape = tuple(batch["input_ids"].shape) if "input_ids" in batch else None
        n = len(batch.get("samples", []))
        raise TrainingRefused(
            f"out of GPU memory on a batch of {n} samples (tokens {shape}, tiles "
            f"{tuple(batch['tiles'].shape) if 'tiles' in batch else '-'}); lower --batch-size "
            f"or --max-len") from err


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


def _dist(use_cuda: bool) -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and not torch.distributed.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local_rank)
        # a long timeout: the other ranks wait in a collective while rank 0 writes a checkpoint
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo",
                                             timeout=datetime.timedelta(hours=2))
    return int(os.environ.get("RANK", "0")), world, local_rank


def train(shards: str | Path, out: str | Path, run_cfg: RunConfig, model_cfg: ModelConfig | None = None,
          init: str | Path | None = None, resume: bool = False, skip_validation: bool = False,
          from_scratch: bool = False, recipes: str | Path | None = None,
          on_step: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train one stage; returns the run summary (also RUN/summary.json)."""
    from schemas.recipes import load_recipes

    shards, out = Path(shards), Path(out)
    plan = plan_for(run_cfg.stage, load_recipes(recipes))
    verdict = check_verdict(shards, plan.stage, skip_validation)
    files = list_shards(shards)
    if run_cfg.device == "cuda" and not torch.cuda.is_available():
        raise TrainingRefused("--device cuda but no CUDA GPU is visible; use --device cpu")
    use_cuda = run_cfg.device == "cuda" or (run_cfg.device == "auto" and torch.cuda.is_available())
    rank, world, local_rank = _dist(use_cuda)
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)

    resuming = resume and ckpt.latest(out) is not None
    if ckpt.latest(out) is not None and not resume:
        raise TrainingRefused(f"{out} already holds checkpoints; pass --resume to continue it, or "
                              "choose a new --out")
    torch.manual_seed(run_cfg.seed)
    if resuming:
        meta = ckpt.read_json(out / "config.json")
        if meta["stage"] != plan.stage:
            raise TrainingRefused(f"{out} is a stage {meta['stage']} run, not {plan.stage}")
        model, tok, mcfg, origin = build_start(out, plan, files, None, out)
        origin = meta["origin"]
        state = ckpt.read_json(ckpt.latest(out) / "state.json")
        _check_resume(meta, state, run_cfg, world)
    else:
        if init is None and plan.previous and not from_scratch:
            raise TrainingRefused(f"stage {plan.stage} starts from stage {plan.previous}'s run "
                                  f"folder: pass --init RUN_{plan.previous} (or --from-scratch)")
        shared_tok = None
        mc = model_cfg or ModelConfig()
        if world > 1 and init is None and not (mc.tokenizer_path or mc.llm_path):
            # one BPE for all ranks: rank 0 trains it, the others read it
            if rank == 0:
                out.mkdir(parents=True, exist_ok=True)
                train_tokenizer(_texts(files), mc.bpe_vocab_size).save(str(out / "tokenizer.json"))
            torch.distributed.barrier()
            shared_tok = Tokenizer.from_file(str(out / "tokenizer.json"))
        model, tok, mcfg, origin = build_start(out, plan, files, model_cfg,
                                               Path(init) if init else None, shared_tok)
        state = {"step": 0, "position": {}}
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            tok.save(str(out / "tokenizer.json"))
            ckpt.write_json(out / "verdict.json", verdict)
            ckpt.write_json(out / "config.json", {
                "stage": plan.stage, "model": mcfg.to_dict(), "run": run_cfg.to_dict(),
                "llm_config": model.llm.config.to_dict(), "trainable": list(plan.trainable),
                "frozen": list(plan.frozen), "kind": plan.kind, "shards": str(shards.resolve()),
                "validated": not skip_validation, "origin": origin, "world_size": world})
    params = freeze(model, plan)
    model.to(device)
    opt = torch.optim.AdamW(params, lr=run_cfg.lr, weight_decay=run_cfg.weight_decay)
    if resuming:
        opt.load_state_dict(torch.load(ckpt.latest(out) / "optimizer.pt", map_location=device))
    start = state["step"]  # a resumed run continues the warmup where it stopped
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (start + s + 1) / run_cfg.warmup_steps) if run_cfg.warmup_steps else 1.0)
    net: torch.nn.Module = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[local_rank] if use_cuda else None, find_unused_parameters=True)

    template = ChatTemplate(tok, mcfg.tokens_per_tile)
    settings = LoaderSettings(plan.kind, run_cfg.batch_size, run_cfg.max_len, run_cfg.seed,
                              run_cfg.shuffle_buffer, codec_hop=mcfg.codec_hop)
    position = {int(k): v for k, v in state["position"].items()}
    workers = run_cfg.num_workers
    if workers is None and state.get("workers") is not None:
        workers = state["workers"]  # a resumed run keeps its readers
    if workers is None:  # on a GPU, decode beside the step; on a CPU the step needs the cores
        workers = min(4, max(1, (os.cpu_count() or 2) // world - 1)) if use_cuda else 0
    state["workers"] = workers
    loader = torch.utils.data.DataLoader(
        StageLoader(files, template, settings, rank, world, position,
                    rotate=state["step"] % workers if workers else 0), batch_size=None,
        num_workers=workers, pin_memory=use_cuda, persistent_workers=workers > 0)
    return _loop(model, net, opt, sched, loader, run_cfg, plan, out, state, device, use_cuda,
                 rank, world, on_step, verdict)


def _loop(model: VitaModel, net: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any,
          loader: Any, run_cfg: RunConfig, plan: StagePlan, out: Path, state: dict[str, Any],
          device: torch.device, use_cuda: bool, rank: int, world: int,
          on_step: Callable[[dict[str, Any]], None] | None, verdict: dict[str, Any]) -> dict[str, Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    step = state["step"]
    position: dict[int, list[int]] = {int(k): v for k, v in state["position"].items()}
    errors_seen: dict[int, int] = {}
    state_w = run_cfg.state_loss_weight if plan.state_head else 0.0
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if use_cuda
                else contextlib.nullcontext())
    metrics = (out / "metrics.jsonl").open("a") if rank == 0 else None
    it = iter(loader)
    total_wait = total_time = 0.0
    tokens_total = 0
    last: dict[str, Any] = {}
    progress = Progress(TextColumn(f"stage {plan.stage}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                        disable=rank != 0)
    with progress:
        task = progress.add_task("train", total=run_cfg.steps, completed=step, info="")
        while step < run_cfg.steps:
            t0 = time.perf_counter()
            batch = next(it)
            t1 = time.perf_counter()
            position[batch["reader"]] = [batch["epoch"], batch["index"] + 1]
            errors_seen[batch["reader"]] = batch["errors"]
            batch = _to(batch, device)
            with _oom_message(batch):
                with autocast:
                    res = net(batch, state_w)
                loss_t = res["loss"]
                finite = torch.isfinite(loss_t.detach()).float().reshape(1)
                if world > 1:  # every rank stops together, none waits alone in a collective
                    torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
                if not finite.item():
                    raise TrainingRefused(f"loss became {float(loss_t)} at step {step + 1} (on some "
                                          f"rank); lower --lr (now {run_cfg.lr})")
                if not loss_t.requires_grad:  # nothing trainable was used: a zero step, all ranks
                    loss_t = loss_t + sum(p.sum() for p in model.parameters() if p.requires_grad) * 0
                opt.zero_grad(set_to_none=True)
                loss_t.backward()
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
                opt.step()
                sched.step()
            if use_cuda:
                torch.cuda.synchronize(device)
            t2 = time.perf_counter()
            step += 1
            wait, dt = t1 - t0, t2 - t0
            total_wait += wait
            total_time += dt
            tokens_total += batch["tokens"]
            loss = float(res["loss"].detach())
            last = {"step": step, "loss": loss, "lr": sched.get_last_lr()[0],
                    **{k: float(v.detach()) for k, v in res.items() if k != "loss" and v.dim() == 0},
                    "tokens": batch["tokens"], "tokens_per_s": batch["tokens"] / dt,
                    "data_wait_s": wait, "step_s": dt, "data_wait_frac": wait / dt,
                    "skipped_samples": sum(errors_seen.values()), "epoch": batch["epoch"],
                    "samples": batch["samples"]}
            if "padding" in batch:
                last["padding"] = batch["padding"]
            if metrics and step % run_cfg.log_every == 0:
                metrics.write(json.dumps(last) + "\n")
                metrics.flush()
            if on_step:
                on_step(last)
            progress.update(task, completed=step, info=(
                f"loss {loss:.3f}  {last['tokens_per_s']:.0f} tok/s  "
                f"data wait {100 * total_wait / total_time:.0f}%"))
            if run_cfg.save_every and step % run_cfg.save_every == 0 and step < run_cfg.steps:
                _save(model, opt, out, step, position, world, rank, state["workers"])
    _save(model, opt, out, step, position, world, rank, state["workers"])
    summary = {"stage": plan.stage, "steps": step, "final": last, "run": str(out),
               "tokens": tokens_total, "data_wait_frac": total_wait / max(total_time, 1e-9),
               "skipped_samples": sum(errors_seen.values()), "device": str(device),
               "world_size": world, "validated": not verdict.get("skipped", False)}
    if metrics:
        metrics.close()
        ckpt.write_json(out / "summary.json", summary)
    return summary


def _save(model: VitaModel, opt: torch.optim.Optimizer, out: Path, step: int,
          position: dict[int, list[int]], world: int, rank: int, workers: int) -> None:
    if world > 1:
        parts: list[Any] = [None] * world
        torch.distributed.all_gather_object(parts, position)
        position = {k: v for p in parts for k, v in p.items()}
    if rank == 0:
        ckpt.save(out, step, model, opt, {"position": {str(k): v for k, v in position.items()},
                                          "workers": workers, "world_size": world})
    if world > 1:
        torch.distributed.barrier()


def clean_run(out: str | Path) -> None:
    """Remove a run folder (tests and `--overwrite`)."""
    shutil.rmtree(out, ignore_errors=True)
