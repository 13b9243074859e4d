"""Stage recipes: which pools feed each VITA-1.5 sub-stage, in what fraction, and what trains.

The defaults reproduce the paper's table; `vita-corpus recipes --out DIR` writes them as YAML
files to edit, and `--recipes DIR` builds with the edited ones. Fractions are shares of each
pool, drawn by a seeded hash of (seed, stage, pool, sample id), so a rebuild selects the same
samples and a changed recipe changes only its own stage.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from schemas.config import ConfigError
from schemas.contract import DEFAULT_MAX_LEN

# Pools are source kinds; "qa_all" groups everything the paper counts as QA.
POOLS = ("caption", "qa", "ocr", "video", "text", "asr", "tts_pair")
MODULES = ("vision_encoder", "vision_adapter", "llm", "audio_encoder", "ctc_head",
           "audio_adapter", "task_tokens", "state_head", "codec", "nar_decoder", "ar_decoder")


class StageRecipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stage: str = Field(pattern=r"^[0-9]+\.[0-9]+[a-z]?$", description="e.g. 1.1, 2.1a, 3.2")
    name: str
    pools: dict[str, float] = Field(description="pool (source kind) -> fraction of it")
    speech_fraction: float = Field(default=0.0, ge=0, le=1,
                                   description="share of questions turned into TTS speech")
    trainable: list[str] = Field(description="modules that train; the rest are frozen")
    shard_max_samples: int = Field(default=1000, ge=1)
    max_len: int = Field(default=DEFAULT_MAX_LEN, ge=1,
                         description="longest sequence the stage trains on (estimated tokens)")

    @field_validator("pools")
    @classmethod
    def _pools(cls, v: dict[str, float]) -> dict[str, float]:
        for pool, frac in v.items():
            if pool not in POOLS:
                raise ValueError(f"unknown pool {pool!r}; use one of {list(POOLS)}")
            if not 0 <= frac <= 1:
                raise ValueError(f"fraction of {pool!r} must be in [0, 1], got {frac}")
        if not v:
            raise ValueError("a stage needs at least one pool")
        return v

    @field_validator("trainable")
    @classmethod
    def _modules(cls, v: list[str]) -> list[str]:
        bad = [m for m in v if m not in MODULES]
        if bad:
            raise ValueError(f"unknown modules {bad}; use names from {list(MODULES)}")
        return v

    @property
    def dirname(self) -> str:
        return f"stage_{self.stage}"


_QA = {"qa": 1.0, "ocr": 1.0, "video": 1.0, "text": 1.0}
DEFAULT_RECIPES: list[StageRecipe] = [
    StageRecipe(stage="1.1", name="vision alignment", pools={"caption": 0.2},
                trainable=["vision_adapter"]),
    StageRecipe(stage="1.2", name="vision understanding", pools={"caption": 1.0},
                trainable=["vision_encoder", "vision_adapter", "llm"]),
    StageRecipe(stage="1.3", name="vision SFT", pools={**_QA, "caption": 0.2},
                trainable=["vision_encoder", "vision_adapter", "llm"]),
    StageRecipe(stage="2.1a", name="audio encoder", pools={"asr": 1.0},
                trainable=["audio_encoder", "ctc_head"]),
    StageRecipe(stage="2.1b", name="audio alignment", pools={"asr": 1.0},
                trainable=["audio_adapter", "task_tokens"]),
    StageRecipe(stage="2.2", name="audio SFT", speech_fraction=0.5,
                pools={"caption": 0.04, **{k: 0.2 for k in _QA}},
                trainable=["vision_encoder", "vision_adapter", "llm", "audio_encoder",
                           "audio_adapter", "task_tokens", "state_head"]),
    StageRecipe(stage="3.1", name="codec", pools={"tts_pair": 1.0}, trainable=["codec"]),
    StageRecipe(stage="3.2", name="speech decoders", pools={"tts_pair": 1.0},
                trainable=["nar_decoder", "ar_decoder"]),
]


def write_recipes(folder: str | Path, recipes: list[StageRecipe] = DEFAULT_RECIPES) -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for r in recipes:
        p = folder / f"stage_{r.stage}.yaml"
        p.write_text(yaml.safe_dump(r.model_dump(), sort_keys=False))
        paths.append(p)
    return paths


def load_recipes(folder: str | Path | None = None) -> dict[str, StageRecipe]:
    """The recipes in `folder` (stage_*.yaml), or the defaults; keyed by stage id."""
    if folder is None:
        return {r.stage: r for r in DEFAULT_RECIPES}
    folder = Path(folder)
    files = sorted(folder.glob("stage_*.yaml"))
    if not files:
        raise ConfigError(f"no stage_*.yaml recipes in {folder}; write the defaults with "
                          f"`vita-corpus recipes --out {folder}`")
    out = {}
    for f in files:
        try:
            r = StageRecipe.model_validate(yaml.safe_load(f.read_text()))
        except (ValidationError, yaml.YAMLError) as err:
            raise ConfigError(f"invalid stage recipe {f}: {err}") from None
        out[r.stage] = r
    return out


def select_stages(recipes: dict[str, StageRecipe], spec: str | None) -> list[StageRecipe]:
    """`1.1,2.2` -> those recipes (in recipe order); None or 'all' -> every recipe."""
    if not spec or spec == "all":
        return list(recipes.values())
    wanted = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in recipes]
    if unknown:
        raise ConfigError(f"unknown stage(s) {unknown}; known: {list(recipes)}")
    return [recipes[s] for s in wanted]


def max_tokens_for(configured: int | None, recipes: list[StageRecipe] | None = None) -> int:
    """The per-sample token budget: `sample.max_tokens` of the config, else the longest
    max_len of the stages built (the default recipes when none are given)."""
    from schemas.contract import resolve_max_tokens

    return resolve_max_tokens(configured, [r.max_len for r in recipes or DEFAULT_RECIPES])
