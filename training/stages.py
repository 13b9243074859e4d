"""Stage plans: what each VITA-1.5 sub-stage trains, on which kind of batch, after which stage.

What trains comes from the stage recipe (schemas.recipes: the paper's table by default, or the
user's edited YAML); everything else is frozen. Each stage starts from the checkpoint folder of
the stage before it.
"""

from __future__ import annotations

from dataclasses import dataclass

from schemas.recipes import MODULES, StageRecipe, load_recipes


@dataclass(frozen=True)
class StagePlan:
    stage: str
    kind: str  # the loader/loss: lm (chat LM loss), ctc, codec, tts (speech decoders)
    previous: str | None  # the stage whose checkpoint this one starts from
    trainable: tuple[str, ...]

    @property
    def state_head(self) -> bool:
        return "state_head" in self.trainable

    @property
    def frozen(self) -> tuple[str, ...]:
        return tuple(m for m in MODULES if m not in self.trainable)


# stage -> (batch kind, previous stage)
_ORDER: dict[str, tuple[str, str | None]] = {
    "1.1": ("lm", None),
    "1.2": ("lm", "1.1"),
    "1.3": ("lm", "1.2"),
    "2.1a": ("ctc", "1.3"),
    "2.1b": ("lm", "2.1a"),
    "2.2": ("lm", "2.1b"),
    "3.1": ("codec", "2.2"),
    "3.2": ("tts", "3.1"),
}
STAGES = tuple(_ORDER)


def plan_for(stage: str, recipes: dict[str, StageRecipe] | None = None) -> StagePlan:
    if stage not in _ORDER:
        raise ValueError(f"no training plan for stage {stage!r}; stages: {', '.join(STAGES)}")
    recipes = recipes or load_recipes()
    if stage not in recipes:
        raise ValueError(f"no recipe for stage {stage!r} in the recipes given")
    kind, prev = _ORDER[stage]
    trainable = tuple(recipes[stage].trainable)
    if not trainable:
        raise ValueError(f"the recipe of stage {stage} trains no module")
    return StagePlan(stage, kind, prev, trainable)
