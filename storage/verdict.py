"""A stage's validation verdict as data: where it lives, and whether it still holds.

The gate (flows.validation) writes OUT/validation/<stage>.verdict.json: pass or fail, and the
sha256 of every shard it passed. Whatever reads a stage for training or export checks the
verdict here, against the shards on disk now, without importing the gate.
"""

from __future__ import annotations

import json
from typing import Any

from storage import uri
from storage.shards import sha256_of

VALIDATION_DIR = "validation"


class ValidationRequired(RuntimeError):
    """A stage has no passing verdict for the shards that are there now."""


def stage_dir_name(stage: str) -> str:
    """'2.2' or 'stage_2.2' -> 'stage_2.2'."""
    return stage if stage.startswith("stage_") else f"stage_{stage}"


def verdict_path(out: str, stage: str) -> str:
    return uri.join(out, VALIDATION_DIR, f"{stage_dir_name(stage)}.verdict.json")


def require_verdict(out: str, stage: str) -> dict[str, Any]:
    """The stage's verdict, if it passed and still matches the shards on disk; else raise."""
    stage = stage_dir_name(stage)
    path = verdict_path(out, stage)
    if not uri.exists(path):
        raise ValidationRequired(f"{out}/{stage} has not been validated: run "
                                 f"`vita-corpus validate {out} --stage {stage[6:]}`")
    verdict = json.loads(uri.read_bytes(path))
    if not verdict.get("passed"):
        raise ValidationRequired(f"{out}/{stage} failed validation ({len(verdict['failed'])} "
                                 f"expectations); see {verdict['data_docs']}")
    if not verdict.get("samples"):
        raise ValidationRequired(f"{out}/{stage} holds no samples: its pools had no data")
    now = {n: sha256_of(uri.join(out, stage, n))[1] for n in uri.listdir(uri.join(out, stage))
           if n.endswith(".tar")}
    if now != verdict["shards"]:
        changed = sorted(set(now.items()) ^ set(verdict["shards"].items()))
        raise ValidationRequired(f"{out}/{stage} changed since it was validated "
                                 f"({len(changed)} shard entries differ); validate it again")
    return verdict
