"""One training loop for every stage: load the start point, freeze by plan, step, checkpoint.

`train(...)` refuses shards without a passing validation verdict that matches their current
checksums (unless told to skip, which it says loudly), starts from the previous stage's run
folder (or, for 1.1, from fresh weights / a local Qwen2 folder), trains exactly the modules the
stage's recipe names, and writes a run folder (see training.checkpoint). On a GPU it runs in
bf16 autocast; under `torchrun` each process is a DDP rank (or, with --fsdp, an FSDP2 rank:
training.sharding) reading its own part of the shards.

A run's data-parallel width (processes x --grad-accum micro-batches, fixed when it starts) is
the number of data ranks; a step averages one micro-batch from each. A resume may use another
number of processes if it divides that width: each process then runs more (or fewer)
micro-batches per step, so the samples and the averaged gradient of every step stay the same.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from storage.verdict import ValidationRequired, require_verdict
from training import checkpoint as ckpt
from training import sharding, towers
from training.config import ModelConfig, RunConfig, TrainConfigError
from training.data import LoaderSettings, StageLoader, list_shards
from training.model import VitaModel
from training.stages import StagePlan, plan_for
from training.template import SPECIAL, ChatTemplate, load_tokenizer, train_tokenizer

log = logging.getLogger("vita_corpus.training")


class TrainingRefused(RuntimeError):
    """The run cannot start as asked; the message says what to do."""


def check_verdict(shards: Path, stage: str, skip: bool) -> dict[str, Any]:
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
                init: Path | None, tokenizer: Tokenizer | None = None, weights: bool = True
                ) -> tuple[VitaModel, Tokenizer, ModelConfig, dict[str, Any]]:
    """The model and tokenizer this stage starts from, and what they came from. weights=False
    leaves a run's checkpoint unread (a sharded resume reads it after sharding)."""
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
        tower = None
        if cfg.vision_path:
            if not (init / "vision_tower" / "config.json").is_file():
                raise TrainingRefused(f"{init} was trained with the vision tower {cfg.vision_path} "
                                      f"but lacks its config in {init}/vision_tower/")
            tower, _ = towers.load(init / "vision_tower", weights=False)
        model = VitaModel(cfg, tok.get_vocab_size(), _special(tok), llm=llm, tower=tower)
        if weights:
            ckpt.load_weights(model, prev)
        return model, tok, cfg, {"init": str(init), "init_checkpoint": str(prev),
                                 "init_stage": meta["stage"], "vision_tower": str(init / "vision_tower")
                                 if cfg.vision_path else None}
    cfg = cfg or ModelConfig()
    tower = None
    if cfg.vision_path:
        try:
            cfg = towers.resolve(cfg)
            tower, _ = towers.load(cfg.vision_path)
        except towers.TowerError as err:
            raise TrainConfigError(str(err)) from None
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
    model = VitaModel(cfg, tok.get_vocab_size(), _special(tok), llm=llm, tower=tower)
    return model, tok, cfg, {"init": None, "tokenizer": source, "llm_path": cfg.llm_path,
                             "vision_tower": cfg.vision_path}


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
_DATA_SETTINGS = ("batch_size", "max_len", "seed", "shuffle_buffer", "pack")


def _check_resume(meta: dict[str, Any], state: dict[str, Any], run_cfg: RunConfig, world: int) -> int:
    """Refuse a resume that would change which samples a step sees; returns the micro-batches
    per step that keep the run's data-parallel width on `world` processes."""
    saved = meta["run"]
    defaults = RunConfig(stage=meta["stage"])
    changed = [f"{k}: {saved.get(k, getattr(defaults, k))} -> {getattr(run_cfg, k)}"
               for k in _DATA_SETTINGS if saved.get(k, getattr(defaults, k)) != getattr(run_cfg, k)]
    if changed:
        raise TrainingRefused("--resume with other data settings would replay or skip samples ("
                              + "; ".join(changed) + "); resume with the run's own settings "
                              "(see its config.json)")
    if state.get("workers") is not None and run_cfg.num_workers is not None \
            and state["workers"] != run_cfg.num_workers:
        raise TrainingRefused(f"--resume with --num-workers {run_cfg.num_workers}, but the run used "
                              f"{state['workers']} (its loader position is per worker)")
    width = int(meta.get("data_parallel", meta.get("world_size", 1)))
    if width % world:
        raise TrainingRefused(
            f"the run's data-parallel width is {width} (processes x grad_accum when it started), "
            f"which {world} processes cannot split; resume on a number of processes that divides "
            f"{width} (each then runs {width}/N micro-batches per step)")
    accum = width // world
    if run_cfg.grad_accum is not None and run_cfg.grad_accum != accum:
        raise TrainingRefused(f"--grad-accum {run_cfg.grad_accum} on {world} process(es) changes the "
                              f"run's data-parallel width {width}; leave --grad-accum out (it "
                              f"becomes {accum})")
    return accum


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


def _dist(use_cuda: bool, fsdp: bool) -> tuple[int, int, int, bool]:
    """rank, world size, local rank, and whether this call started a one-process group (FSDP on
    one process, e.g. one GPU, still needs a process group)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    own = False
    if (world > 1 or fsdp) and not torch.distributed.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local_rank)
        backend = "nccl" if use_cuda else "gloo"
        # a long timeout: the other ranks wait in a collective while rank 0 writes a checkpoint
        timeout = datetime.timedelta(hours=2)
        if world > 1:
            torch.distributed.init_process_group(backend, timeout=timeout)
        else:
            torch.distributed.init_process_group(backend, store=torch.distributed.HashStore(),
                                                 rank=0, world_size=1, timeout=timeout)
            own = True
    return int(os.environ.get("RANK", "0")), world, local_rank, own


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
    if run_cfg.pack and plan.kind != "lm":
        raise TrainingRefused(f"--pack packs chat sequences; stage {plan.stage} trains on "
                              f"{plan.kind} batches of audio: drop --pack")
    if run_cfg.device == "cuda" and not torch.cuda.is_available():
        raise TrainingRefused("--device cuda but no CUDA GPU is visible; use --device cpu")
    use_cuda = run_cfg.device == "cuda" or (run_cfg.device == "auto" and torch.cuda.is_available())
    rank, world, local_rank, own_group = _dist(use_cuda, run_cfg.fsdp)
    try:
        return _train(shards, out, run_cfg, model_cfg, init, resume, skip_validation, from_scratch,
                      on_step, plan, verdict, files, use_cuda, rank, world, local_rank)
    finally:
        if own_group:
            torch.distributed.destroy_process_group()


def _train(shards: Path, out: Path, run_cfg: RunConfig, model_cfg: ModelConfig | None,
           init: str | Path | None, resume: bool, skip_validation: bool, from_scratch: bool,
           on_step: Callable[[dict[str, Any]], None] | None, plan: StagePlan, verdict: dict[str, Any],
           files: list[str], use_cuda: bool, rank: int, world: int, local_rank: int) -> dict[str, Any]:
    distributed = torch.distributed.is_initialized() and world > 1
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)

    last_ck = ckpt.latest(out)
    resuming = resume and last_ck is not None
    if last_ck is not None and not resume:
        raise TrainingRefused(f"{out} already holds checkpoints; pass --resume to continue it, or "
                              "choose a new --out")
    torch.manual_seed(run_cfg.seed)
    sharded_ck = resuming and sharding.is_sharded(last_ck)
    if resuming:
        meta = ckpt.read_json(out / "config.json")
        if meta["stage"] != plan.stage:
            raise TrainingRefused(f"{out} is a stage {meta['stage']} run, not {plan.stage}")
        if run_cfg.fsdp and not sharded_ck:
            raise TrainingRefused(f"{last_ck} is a whole-model checkpoint (a run without --fsdp); "
                                  "resume it without --fsdp")
        model, tok, mcfg, origin = build_start(out, plan, files, None, out, weights=not sharded_ck)
        run_cfg, memory = _plan_memory(model, plan, run_cfg, world, device, whole_ck=not sharded_ck)
        origin = meta["origin"]
        state = ckpt.read_json(last_ck / "state.json")
        accum = _check_resume(meta, state, run_cfg, world)
        width = accum * world
    else:
        if init is None and plan.previous and not from_scratch:
            raise TrainingRefused(f"stage {plan.stage} starts from stage {plan.previous}'s run "
                                  f"folder: pass --init RUN_{plan.previous} (or --from-scratch)")
        shared_tok = None
        mc = model_cfg or ModelConfig()
        if distributed and init is None and not (mc.tokenizer_path or mc.llm_path):
            # one BPE for all ranks: rank 0 trains it, the others read it
            if rank == 0:
                out.mkdir(parents=True, exist_ok=True)
                train_tokenizer(_texts(files), mc.bpe_vocab_size).save(str(out / "tokenizer.json"))
            torch.distributed.barrier()
            shared_tok = Tokenizer.from_file(str(out / "tokenizer.json"))
        model, tok, mcfg, origin = build_start(out, plan, files, model_cfg,
                                               Path(init) if init else None, shared_tok)
        run_cfg, memory = _plan_memory(model, plan, run_cfg, world, device)
        state = {"step": 0, "position": {}}
        accum = run_cfg.grad_accum or 1
        width = accum * world
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            tok.save(str(out / "tokenizer.json"))
            if origin.get("vision_tower"):
                towers.copy_config(origin["vision_tower"], out / "vision_tower")
            ckpt.write_json(out / "verdict.json", verdict)
            ckpt.write_json(out / "config.json", {
                "stage": plan.stage, "model": mcfg.to_dict(), "run": run_cfg.to_dict(),
                "llm_config": model.llm.config.to_dict(), "trainable": list(plan.trainable),
                "frozen": list(plan.frozen), "kind": plan.kind, "shards": str(shards.resolve()),
                "validated": not skip_validation, "origin": origin, "world_size": world,
                "data_parallel": width, "sharding": memory.to_dict()})
    params = freeze(model, plan)
    if run_cfg.activation_checkpointing:
        n = sharding.checkpoint_activations(model)
        log.info("activation checkpointing on %d blocks", n)
    if run_cfg.fsdp:
        model.uniform_paths = True
        n = sharding.shard(model, device, world)
        log.info("FSDP: %d block units and the root over %d process(es)%s", n, world,
                 ", bf16 parameters, fp32 reduction" if use_cuda else "")
        params = [p for p in model.parameters() if p.requires_grad]  # now the sharded ones
    else:
        model.to(device)
    opt = torch.optim.AdamW(params, lr=run_cfg.lr, weight_decay=run_cfg.weight_decay)
    if sharded_ck:
        sharding.load(last_ck, model, opt)
    elif resuming:
        opt.load_state_dict(torch.load(last_ck / "optimizer.pt", map_location=device))
    start = state["step"]  # a resumed run continues the warmup where it stopped
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (start + s + 1) / run_cfg.warmup_steps) if run_cfg.warmup_steps else 1.0)
    net: torch.nn.Module = model
    if distributed and not run_cfg.fsdp:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[local_rank] if use_cuda else None, find_unused_parameters=True)

    template = ChatTemplate(tok, mcfg.tokens_per_tile)
    settings = LoaderSettings(plan.kind, run_cfg.batch_size, run_cfg.max_len, run_cfg.seed,
                              run_cfg.shuffle_buffer, codec_hop=mcfg.codec_hop,
                              image_size=mcfg.image_size, pack=run_cfg.pack)
    position = {int(k): v for k, v in state["position"].items()}
    workers = run_cfg.num_workers
    if workers is None and state.get("workers") is not None:
        workers = state["workers"]  # a resumed run keeps its readers
    if workers is None:  # on a GPU, decode beside the step; on a CPU the step needs the cores
        workers = min(4, max(1, (os.cpu_count() or 2) // world - 1)) if use_cuda else 0
    state["workers"] = workers
    # Data rank d (of the run's fixed width) reads as process d of a width-process run would;
    # this process runs data ranks rank*accum ... rank*accum + accum-1, one micro-batch each.
    loaders = [torch.utils.data.DataLoader(
        StageLoader(files, template, settings, d, width, position,
                    rotate=state["step"] % workers if workers else 0), batch_size=None,
        num_workers=workers, pin_memory=use_cuda, persistent_workers=workers > 0)
        for d in range(rank * accum, (rank + 1) * accum)]
    return _loop(model, net, opt, sched, loaders, run_cfg, plan, out, state, device, use_cuda,
                 rank, world, on_step, verdict, memory)


def _plan_memory(model: VitaModel, plan: StagePlan, run_cfg: RunConfig, world: int,
                 device: torch.device, whole_ck: bool = False) -> tuple[RunConfig, sharding.MemoryPlan]:
    """Shard or not (training.sharding.plan_memory), on the stage's trainable parts; the run's
    settings with fsdp as decided."""
    freeze(model, plan)
    device_gb = run_cfg.memory_gb
    if device_gb is None and device.type == "cuda":
        device_gb = torch.cuda.get_device_properties(device).total_memory / sharding.GB
    try:
        memory = sharding.plan_memory(model, run_cfg.fsdp, world, device_gb,
                                      resuming_whole=whole_ck and not run_cfg.fsdp)
    except sharding.DoesNotFit as err:
        raise TrainingRefused(str(err)) from None
    log.info("sharding: %s", memory.reason)
    if memory.fsdp != run_cfg.fsdp:
        run_cfg = dataclasses.replace(run_cfg, fsdp=memory.fsdp)
    return run_cfg, memory


# batch members whose absence makes the uniform paths (FSDP) run a module on a blank input
_PATHS = ("tiles", "audio", "state_index")
_PATH_MODULES = (("vision_encoder", "vision_adapter"), ("audio_encoder", "audio_adapter"), ("state_head",))


def _drop_blank_grads(model: VitaModel, micro: list[dict[str, Any]], world: int,
                      device: torch.device) -> None:
    """A module that ran only on a blank input this step, on every process, got zero gradients;
    drop them, so AdamW skips it as it would an unused module (no momentum step, no decay)."""
    used = torch.tensor([any(m["paths"][i] for m in micro) for i in range(len(_PATHS))],
                        dtype=torch.float32, device=device)
    if world > 1:
        torch.distributed.all_reduce(used, op=torch.distributed.ReduceOp.MAX)
    for flag, names in zip(used.tolist(), _PATH_MODULES, strict=True):
        if not flag:
            for name in names:
                for p in getattr(model, name).parameters():
                    p.grad = None


def _combine(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One step's figures from every micro-batch of every process (in data-rank order)."""
    micro = [m for p in parts for m in p["micro"]]
    scalars: dict[str, list[float]] = {}
    for m in micro:
        for k, v in m["scalars"].items():
            scalars.setdefault(k, []).append(v)
    row = {"loss": sum(m["loss"] for m in micro) / len(micro),
           **{k: sum(v) / len(v) for k, v in scalars.items()},
           "tokens": sum(m["tokens"] for m in micro),
           "samples": [k for m in micro for k in m["samples"]],
           "epoch": micro[0]["epoch"],
           "skipped_samples": sum(p["errors"] for p in parts)}
    slots = [m["slots"] for m in micro if m.get("slots")]
    if slots:  # chat batches: the share of the step's token slots that is padding
        row["padding"] = 1 - sum(m["tokens"] for m in micro if m.get("slots")) / sum(slots)
    return row


def _loop(model: VitaModel, net: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any,
          loaders: list[Any], run_cfg: RunConfig, plan: StagePlan, out: Path, state: dict[str, Any],
          device: torch.device, use_cuda: bool, rank: int, world: int,
          on_step: Callable[[dict[str, Any]], None] | None, verdict: dict[str, Any],
          memory: sharding.MemoryPlan) -> dict[str, Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    step = state["step"]
    # this process's readers (data rank d, worker w -> reader d*workers + w) and where they are;
    # a checkpoint takes each reader's position from the process that owns it
    per = max(1, state["workers"])
    owned = {d * per + w for d in range(rank * len(loaders), (rank + 1) * len(loaders)) for w in range(per)}
    position: dict[int, list[int]] = {int(k): v for k, v in state["position"].items() if int(k) in owned}
    errors_seen: dict[int, int] = {}
    state_w = run_cfg.state_loss_weight if plan.state_head else 0.0
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if use_cuda
                else contextlib.nullcontext())
    metrics = (out / "metrics.jsonl").open("a") if rank == 0 else None
    its = [iter(ld) for ld in loaders]
    accum = len(its)
    ddp = isinstance(net, torch.nn.parallel.DistributedDataParallel)
    trainable = [p for p in model.parameters() if p.requires_grad]
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
            wait = 0.0
            micro: list[dict[str, Any]] = []
            opt.zero_grad(set_to_none=True)
            for j, it in enumerate(its):
                w0 = time.perf_counter()
                batch = next(it)
                wait += time.perf_counter() - w0
                position[batch["reader"]] = [batch["epoch"], batch["index"] + 1]
                errors_seen[batch["reader"]] = batch["errors"]
                batch = _to(batch, device)
                # DDP reduces gradients on the last micro-batch only; FSDP reduce-scatters each
                # one (it keeps only its shard of the summed gradients)
                sync = net.no_sync() if ddp and j < accum - 1 else contextlib.nullcontext()
                with _oom_message(batch), sync:
                    with autocast:
                        res = net(batch, state_w)
                    loss_t = res["loss"]
                    finite = torch.isfinite(loss_t.detach()).float().reshape(1)
                    if world > 1:  # every rank stops together, none waits alone in a collective
                        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
                    if not finite.item():
                        raise TrainingRefused(f"loss became {float(loss_t)} at step {step + 1} (on some "
                                              f"rank); lower --lr (now {run_cfg.lr})")
                    if not loss_t.requires_grad and not run_cfg.fsdp:
                        # nothing trainable was used: a zero step, on all ranks
                        loss_t = loss_t + sum(p.sum() for p in trainable) * 0
                    if loss_t.requires_grad:  # under FSDP the same on every rank (uniform paths)
                        (loss_t / accum).backward()
                micro.append({"loss": float(loss_t.detach()), "tokens": batch["tokens"],
                              "paths": [int(batch[k].shape[0]) > 0 for k in _PATHS if k in batch],
                              "samples": batch["samples"], "epoch": batch["epoch"],
                              "slots": batch.get("slots"),
                              "scalars": {k: float(v.detach()) for k, v in res.items()
                                          if k not in ("loss", "per_sample") and v.dim() == 0}})
            if model.uniform_paths and plan.kind == "lm":
                _drop_blank_grads(model, micro, world, device)
            with _oom_message(batch):
                torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                opt.step()
                sched.step()
            if use_cuda:
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            step += 1
            total_wait += wait
            total_time += dt
            mine = {"micro": micro, "errors": sum(errors_seen.values())}
            parts: list[Any] = [mine]
            if world > 1:  # the step's figures over all processes, on every rank
                parts = [None] * world
                torch.distributed.all_gather_object(parts, mine)
            row = _combine(parts)
            tokens_total += row["tokens"]
            last = {"step": step, "loss": row.pop("loss"), "lr": sched.get_last_lr()[0], **row,
                    "tokens_per_s": row["tokens"] / dt, "data_wait_s": wait, "step_s": dt,
                    "data_wait_frac": wait / dt, "micro_batches": accum * world}
            if metrics and step % run_cfg.log_every == 0:
                metrics.write(json.dumps(last) + "\n")
                metrics.flush()
            if on_step:
                on_step(last)
            progress.update(task, completed=step, info=(
                f"loss {last['loss']:.3f}  {last['tokens_per_s']:.0f} tok/s  "
                f"data wait {100 * total_wait / total_time:.0f}%"))
            if run_cfg.save_every and step % run_cfg.save_every == 0 and step < run_cfg.steps:
                _save(model, opt, out, step, position, world, rank, state["workers"], run_cfg.fsdp,
                      final=False)
    _save(model, opt, out, step, position, world, rank, state["workers"], run_cfg.fsdp, final=True)
    summary = {"stage": plan.stage, "steps": step, "final": last, "run": str(out),
               "tokens": tokens_total, "data_wait_frac": total_wait / max(total_time, 1e-9),
               "skipped_samples": last.get("skipped_samples", 0), "device": str(device),
               "world_size": world, "micro_batches": accum * world, "fsdp": run_cfg.fsdp,
               "sharding": memory.to_dict(), "validated": not verdict.get("skipped", False)}
    if metrics:
        metrics.close()
        ckpt.write_json(out / "summary.json", summary)
    return summary


def _save(model: VitaModel, opt: torch.optim.Optimizer, out: Path, step: int,
          position: dict[int, list[int]], world: int, rank: int, workers: int, fsdp: bool,
          final: bool) -> None:
    if world > 1:
        parts: list[Any] = [None] * world
        torch.distributed.all_gather_object(parts, position)
        position = {k: v for p in parts for k, v in p.items()}
    state = {"position": {str(k): v for k, v in position.items()}, "workers": workers,
             "world_size": world}
    if not fsdp:
        if rank == 0:
            ckpt.save(out, step, model, opt, state)
        if world > 1:
            torch.distributed.barrier()
        return
    from safetensors.torch import save_file

    # every process writes its slices into one staging folder, which rank 0 then commits
    tmp = ckpt.staging(out, step, tag="sharded") if rank == 0 else None
    tmp = _broadcast(tmp, world)
    sharding.save(tmp, model, opt)
    full = sharding.full_weights(model) if final else {}
    if rank == 0:
        if final:
            save_file(full, str(tmp / "model.safetensors"))
        ckpt.commit(out, step, tmp, {**state, "sharded": True})
    torch.distributed.barrier()


def _broadcast(value: Any, world: int) -> Any:
    if world == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]

