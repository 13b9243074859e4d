"""How the workers read a parquet source's media (issue 27: partitions by row group): each row
group a partition overlaps is read once, only its media column, a batch at a time, and the
shards are the same bytes in-process, on 2 Ray workers and on one at a time."""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from PIL import Image

from flows.build import partitions as partitions_mod
from flows.build.partitions import write_partition
from flows.build.pipeline import build, prepare
from flows.build.plan import SourcePlanner
from schemas.config import load_config
from storage import embedded

from conftest import tars

IMG = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
TURNS = json.dumps([{"from": "human", "value": "<image>\nWhat is it?"},
                    {"from": "gpt", "value": "Noise."}])


def jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (40 + seed % 5, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def write_source(folder: Path) -> None:
    """Two files of 7 rows in row groups of 3, 3 and 1, small pages (a page per row); an unused
    binary column beside the image; row 4 of each file null (the planner rejects it), row 5 of
    the second file a corrupt JPEG (its worker rejects it)."""
    folder.mkdir(parents=True)
    for f, name in enumerate(("a.parquet", "b.parquet")):
        cells = [[{"bytes": jpeg(10 * f + r), "path": None}] for r in range(7)]
        cells[4] = None
        if f == 1:
            cells[5] = [{"bytes": b"\xff\xd8 not a jpeg", "path": None}]
        pq.write_table(pa.table({"id": [f"{name[0]}{r}" for r in range(7)],
                                 "image": pa.array(cells, pa.list_(IMG)),
                                 "unused": [b"x" * 5000] * 7,
                                 "conversations": [TURNS] * 7}),
                       folder / name, row_group_size=3, write_batch_size=1, data_page_size=1024)


def corpus(root: Path) -> Path:
    write_source(root / "data")
    path = root / "corpus.yaml"
    path.write_text(yaml.safe_dump({"shard": {"max_samples": 4}, "sources": [
        {"name": "pq", "kind": "qa", "format": "parquet", "path": "data"}]}))
    return path


def overlapped(part) -> set[tuple[str, int, str]]:
    """The (file, row group, column) of the references the partition's workers read."""
    found = set()
    for inp in part.inputs:
        if "record" in inp:
            image = json.loads(inp["record"])["image"]
            for ref in [image] if isinstance(image, str) else image:
                rel, rest = ref.removeprefix("parquet:").split("#rg")
                found.add((rel, int(rest.split("/")[0]), "image"))
    return found


def test_each_row_group_a_partition_overlaps_is_read_once(tmp_path, monkeypatch):
    monkeypatch.setattr(embedded, "BATCH_ROWS", 2)  # batches inside a row group
    cfg = load_config(corpus(tmp_path))
    out = str(tmp_path / "out")
    cfg = prepare(cfg, out)
    planner = SourcePlanner(cfg, cfg.sources[0], out)
    parts = list(planner.partitions(ranges=1))
    # Ranges of 4 inputs over row groups of 3: boundaries inside row groups, and across files.
    assert [(p.start, p.end) for p in parts] == [(0, 4), (4, 8), (8, 12), (12, 14)]
    assert overlapped(parts[1]) == {("a.parquet", 1, "image"), ("a.parquet", 2, "image"),
                                    ("b.parquet", 0, "image")}
    # The process's worker, as write_partition builds it (once per process): its reader of the
    # source's embedded media keeps the counts.
    stats = partitions_mod._transform_fn(cfg, out).embedded("pq").stats
    overlaps = 0
    for p in reversed(parts):  # as workers finishing out of order: no cursor carries over
        stats.opened.clear()
        planner.add(p.start, p.end, write_partition(cfg, out, p))
        # Each row group the partition overlaps: its image column opened once, in row order;
        # never the unused column, never a row group the partition has no reference into.
        assert list(stats.opened) == sorted(overlapped(p)), (p.start, list(stats.opened))
        overlaps += len(overlapped(p))
    counts = stats.counts()
    # 12 images reach the workers (the planner rejects the two null cells): one cell converted
    # per reference; batches of 2 rows, never more than a column chunk's rows need.
    assert counts["cells"] == 12 and counts["column_chunks"] == overlaps
    assert overlaps < counts["batches"] <= 2 * overlaps
    assert counts["files"] == 4  # partition 4-8 spans both files
    # Each input's result says what reading its media cost (a row group entered afresh here).
    inp = next(i for i in parts[0].inputs if "record" in i)
    worker = partitions_mod._transform_fn(cfg, out)
    result = worker({"source": "pq", "index": inp["index"], "record": inp["record"]})
    assert result["ok"] and result["embedded_reads"]["cells"] == 1
    assert result["embedded_reads"]["column_chunks"] == 1
    stats = planner.finish().to_json()
    assert (stats["inputs"], stats["written"], stats["rejected"]) == (14, 11, 3)


def test_worker_reads_a_row_group_forward_from_a_range_boundary(tmp_path, monkeypatch):
    monkeypatch.setattr(embedded, "BATCH_ROWS", 1)
    write_source(tmp_path / "data")
    reader = embedded.EmbeddedMedia(str(tmp_path / "data"))
    # A partition starting at row 2 of row group 0, going on into row group 1.
    for rg, row in ((0, 2), (1, 0), (1, 2)):  # (row 1 of group 1 is null)
        data = reader.read(embedded.parquet_ref("a.parquet", rg, row, "image", 0), "image")
        assert data == jpeg(3 * rg + row)
    c = reader.stats.counts()
    # rows 0 and 1 of row group 0 (and row 1 of group 1) decoded, since parquet cannot seek
    # inside a row group, but not converted; each row group's image column opened once, the
    # file once.
    assert (c["files"], c["row_groups"], c["column_chunks"], c["cells"]) == (1, 2, 2, 3)
    assert c["batches"] == 3 + 3
    assert list(reader.stats.opened) == [("a.parquet", 0, "image"), ("a.parquet", 1, "image")]
    reader.read(embedded.parquet_ref("a.parquet", 1, 0, "image", 0), "image")  # going back
    assert reader.stats.counts()["column_chunks"] == 3
    reader.close()


def test_parquet_reading_streams_pages_instead_of_the_whole_column_chunk(tmp_path):
    """pyarrow's default pre-buffering reads a row group's whole column chunk for its first
    batch; open_parquet streams it a page at a time."""
    rows = [{"bytes": bytes(np.random.default_rng(i).integers(0, 255, 100_000, np.uint8)),
             "path": None} for i in range(80)]
    pq.write_table(pa.table({"image": pa.array(rows, IMG)}), tmp_path / "big.parquet",
                   row_group_size=80, write_batch_size=1, use_dictionary=False)

    class Counting(io.FileIO):
        read_bytes = 0

        def read(self, size=-1):  # what pyarrow pulls from the file
            data = super().read(size)
            Counting.read_bytes += len(data)
            return data

    with Counting(str(tmp_path / "big.parquet")) as f:
        pf = embedded.open_parquet(f)
        before = Counting.read_bytes
        next(pf.iter_batches(batch_size=2, row_groups=[0], columns=["image"]))
        first = Counting.read_bytes - before
    assert first < 8_000_000 / 2, first  # the buffer's worth of pages, not the 8 MB chunk


def test_shards_identical_in_process_and_on_one_and_two_ray_workers(tmp_path, ray_executor):
    local = build(load_config(corpus(tmp_path / "local")), str(tmp_path / "local/out"))
    two = build(load_config(corpus(tmp_path / "two")), str(tmp_path / "two/out"),
                executor=ray_executor)
    # map_tasks keeps 2 x cpus tasks in flight: with half a CPU, one at a time
    one_at_a_time = copy.copy(ray_executor)
    one_at_a_time.cpus = 0.5
    one = build(load_config(corpus(tmp_path / "one")), str(tmp_path / "one/out"),
                executor=one_at_a_time)
    assert local["sources"] == two["sources"] == one["sources"]
    src = local["sources"]["pq"]
    assert (src["inputs"], src["written"], src["reject_reasons"]) == (
        14, 11, {"null_media": 2, "image_decode_error": 1})
    first = tars(tmp_path / "local/out")
    assert len(first) == 4
    # the build report adds up what the partitions read, whatever ran them: every medium
    # read (12 cells: 14 rows less the 2 null ones), each file's row groups entered
    for report in (local, two, one):
        reads = report["partitions"]["sources"]["pq"]["embedded_reads"]
        assert reads["cells"] == 12 and reads["row_groups"] >= 3, reads
    assert tars(tmp_path / "two/out") == first == tars(tmp_path / "one/out")


def test_two_media_columns_of_a_row_group_each_read_once(tmp_path):
    """A row with an image and an audio cell (LLaVA's image and video columns alike): the
    worker alternates between the columns row by row, each column's cursor moving forward."""
    pq.write_table(pa.table({"image": [jpeg(r) for r in range(6)],
                             "audio": [b"RIFF" + bytes([r]) * 100 for r in range(6)]}),
                   tmp_path / "d.parquet", row_group_size=3)
    reader = embedded.EmbeddedMedia(str(tmp_path))
    for r in range(6):
        rg, row = divmod(r, 3)
        assert reader.read(embedded.parquet_ref("d.parquet", rg, row, "image", None),
                           "image") == jpeg(r)
        assert reader.read(embedded.parquet_ref("d.parquet", rg, row, "audio", None),
                           "audio") == b"RIFF" + bytes([r]) * 100
    c = reader.stats.counts()
    assert (c["files"], c["row_groups"], c["column_chunks"], c["cells"]) == (1, 2, 4, 12)
