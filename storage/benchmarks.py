"""Benchmark files for decontamination: JSON (a list of objects, or an object holding one),
JSON Lines, CSV or parquet, with a question column and optionally an answer and an id."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from typing import Any

from schemas.dedupe import BenchmarkConfig
from storage import uri


class BenchmarkError(ValueError):
    """A benchmark file that cannot be read as configured; the message names the fix."""


def _rows(path: str) -> Iterator[dict[str, Any]]:
    low = path.lower()
    if low.endswith(".parquet"):
        import pyarrow.parquet as pq

        with uri.open_read(path) as f:
            table = pq.read_table(f)
        for batch in table.to_batches(max_chunksize=4096):
            yield from batch.to_pylist()
        return
    data = uri.read_bytes(path).decode("utf-8-sig")
    if low.endswith(".csv"):
        yield from csv.DictReader(io.StringIO(data))
    elif low.endswith((".jsonl", ".ndjson")):
        for line in data.splitlines():
            if line.strip():
                yield json.loads(line)
    elif low.endswith(".json"):
        obj = json.loads(data)
        if isinstance(obj, dict):  # {"data": [...]} or {"questions": [...]}: the one list in it
            lists = [v for v in obj.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise BenchmarkError(f"{path}: a JSON object needs exactly one list of items")
            obj = lists[0]
        yield from obj
    else:
        raise BenchmarkError(f"{path}: a benchmark is .json, .jsonl, .csv or .parquet")


def read_benchmark(bench: BenchmarkConfig) -> Iterator[tuple[str, str]]:
    """(item id, text: the question and its answer) of every item."""
    for n, row in enumerate(_rows(bench.path)):
        if not isinstance(row, dict) or bench.question not in row:
            raise BenchmarkError(
                f"benchmark {bench.name!r} ({bench.path}), item {n}: no column "
                f"{bench.question!r}; set dedupe.benchmarks[].question to the question's column")
        item = row.get(bench.id) if bench.id else row.get("id", row.get("index"))
        text = str(row[bench.question] or "")
        if bench.answer and row.get(bench.answer) is not None:
            text += "\n" + str(row[bench.answer])
        yield (str(item) if item is not None else str(n)), text
