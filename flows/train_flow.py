"""Stage training as a Prefect flow: wait for the shards' validation verdict, then train.

A nightly build and a training launch can be scheduled independently: the training flow polls
for the stage's verdict (the build writes it when validation ends), fails at once on a failed
verdict, and trains when a passing verdict matches the shards on disk. The training task runs in
the flow's process (a GPU job is not spread over a Ray pool); for several GPUs launch the CLI
under torchrun instead.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task

from storage.verdict import ValidationRequired, require_verdict


@task(task_run_name="wait for the verdict of stage {stage}")
def wait_for_verdict(build_out: str, stage: str, timeout_s: float, poll_s: float) -> dict[str, Any]:
    logger = get_run_logger()
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            verdict = require_verdict(build_out, stage)
            logger.info("stage %s: passing verdict over %d samples", stage, verdict["samples"])
            return verdict
        except ValidationRequired as err:
            waiting = "has not been validated" in str(err) or "changed since" in str(err)
            if not waiting or time.monotonic() > deadline:
                raise
            logger.info("waiting for stage %s's verdict: %s", stage, err)
            time.sleep(poll_s)


@task(task_run_name="train stage {stage}")
def train_stage(stage: str, shards: str, out: str, settings: dict[str, Any]) -> dict[str, Any]:
    from training.config import ModelConfig, RunConfig
    from training.loop import train

    run = RunConfig(stage=stage, **settings.get("run", {}))
    model = ModelConfig.load(settings["model_config"]) if settings.get("model_config") else None
    return train(shards, out, run, model, init=settings.get("init"), resume=settings.get("resume", False),
                 from_scratch=settings.get("from_scratch", False), recipes=settings.get("recipes"))


@flow(name="vita-corpus-train", flow_run_name="train stage {stage} -> {out}")
def train_flow(stage: str, shards: str, out: str, settings: dict[str, Any],
               wait_timeout_s: float = 0.0, poll_s: float = 30.0) -> dict[str, Any]:
    folder = Path(shards).resolve()
    wait_for_verdict(str(folder.parent), stage, wait_timeout_s, poll_s)
    return train_stage(stage, shards, out, settings)
