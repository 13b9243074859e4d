"""Deduplication by content: the config of exact, near-duplicate and benchmark checks.

The decisions themselves are made by the build's planner (flows.build.content), in source
order (config order, then input order), so the kept sample of a duplicate set is the first
one whatever the number of workers.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class NearTextConfig(BaseModel):
    """MinHash with LSH banding over a sample's conversation text (word shingles)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    # Jaccard of the shingle sets (MinHash LSH finds the candidates, the sets decide): 0.7 with
    # 3-word shingles is one word changed in 19 or more, two in 36 or more (Data-Juicer's
    # default threshold too)
    threshold: float = Field(default=0.7, gt=0, lt=1)
    action: Literal["reject", "report"] = "reject"
    num_perm: int = Field(default=128, ge=16, le=1024)  # MinHash permutations
    shingle: int = Field(default=3, ge=1, le=16)  # words per shingle
    seed: int | None = None  # the permutations' seed; None: the corpus seed
    min_words: int = Field(default=8, ge=1)  # shorter texts are too short to call near-alike
    max_candidates: int = Field(default=32, ge=1)  # bucket members compared per band hit


class NearImageConfig(BaseModel):
    """A perceptual hash (pHash, 64 bits) per image with a Hamming threshold. `report`: pairs
    found after the ingest from the manifests (the workers hash the images). `reject`: the
    planner also hashes each distinct image once (decoded at reduced scale) and rejects, as
    `near_duplicate_image`, a sample whose image is near an earlier kept sample's image of
    other bytes (the same bytes used again are no duplicate), in source order like the other
    content decisions."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    max_distance: int = Field(default=6, ge=0, le=16)  # differing bits of the 64 at most
    action: Literal["report", "reject"] = "report"

    @property
    def rejects(self) -> bool:
        return self.enabled and self.action == "reject"


class BenchmarkConfig(BaseModel):
    """A benchmark's file: JSON (a list of objects), JSONL, CSV or parquet."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    path: str  # relative paths are relative to the config file
    question: str = "question"  # column of the question
    answer: str | None = "answer"  # column of the answer (None: questions only)
    id: str | None = None  # column of the item id; None: `id`, `index`, else the row number


class DedupeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Same normalised conversation and same media bytes, across sources: kept once.
    exact: bool = False
    # A content-addressed cache of transformed media (tiles, video frames, audio) keyed by
    # (content hash, kind, transform parameters).
    media_cache: bool = True
    cache: str | None = None  # folder or URI; None: OUT/cache/media
    near_text: NearTextConfig = NearTextConfig()
    near_image: NearImageConfig = NearImageConfig()
    benchmarks: list[BenchmarkConfig] = []
    ngram: int = Field(default=13, ge=3, le=64)  # tokens in a shared n-gram that is a leak

    @property
    def decides(self) -> bool:
        """Whether the planner makes content decisions (and hashes media to do so)."""
        return (self.exact or self.near_text.enabled or bool(self.benchmarks)
                or self.near_image.rejects)

    def decisions(self) -> dict:
        """What changes the planner's decisions (not the cache, not the image report)."""
        out = self.model_dump(mode="json", include={"exact", "near_text", "benchmarks", "ngram"})
        if self.near_image.rejects:
            out["near_image"] = self.near_image.model_dump(mode="json")
        return out
