"""The loader: WebDataset over a stage's shards, into padded, length-bucketed batches.

Each data rank (a torchrun process, or one of a process's --grad-accum micro-batches) and each
DataLoader worker is one reader of R = data ranks x workers:
with at least R shards, reader g reads shards g, g+R, ... of the epoch's seeded shard order;
with fewer, every reader streams all shards and keeps every R-th sample. Samples pass a seeded
shuffle buffer, are tokenised with VITA's chat template (without decoding media: lengths come
from the members and the FLAC headers), grouped by length so that padding stays small (or, with
packing, packed several to a row: training.packing), and only then decoded and collated.
Every batch names its reader, epoch and index, which is the resumable position: a resumed
reader skips the batches it already gave, before decoding them.
A sample or shard that fails to read or decode is logged and counted, and the epoch goes on.
"""

from __future__ import annotations

import io
import json
import logging
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import soundfile as sf
import torch
import webdataset as wds

from training.packing import first_fit_decreasing, row_layout
from training.template import IGNORE, PAD, ChatTemplate, Encoded, codec_frames

log = logging.getLogger("vita_corpus.training")

KINDS = ("lm", "ctc", "codec", "tts")
_VISUAL = re.compile(r"<image>|<video>")


class NoShards(FileNotFoundError):
    pass


def list_shards(folder: str | Path) -> list[str]:
    files = sorted(str(p) for p in Path(folder).glob("*.tar"))
    if not files:
        raise NoShards(f"no .tar shards in {folder}; did you run `vita-corpus build`, and is this "
                       "a stage folder such as OUT/stage_2.2?")
    return files


class SkipSample(ValueError):
    """A sample the loader cannot use; counted and logged, never fatal."""


@dataclass
class LoaderSettings:
    kind: str  # lm | ctc | codec | tts
    batch_size: int
    max_len: int
    seed: int
    shuffle_buffer: int
    codec_segment: int = 24000  # samples of 24 kHz audio per codec training example
    max_speech: int = 240000  # 10 s of 24 kHz target speech in stage 3.2
    bucket_batches: int = 8  # batches' worth of samples sorted by length together
    codec_hop: int = 600  # 24 kHz samples per codec frame (40 Hz)
    image_size: int = 448  # tiles and frames are image_size squared
    pack: bool = False  # chat stages: a batch is batch_size rows, each packing samples to max_len


def _group(sample: dict[str, Any]) -> tuple[dict[str, Any], dict[str, bytes]]:
    rec = json.loads(sample["json"])
    members = {k: v for k, v in sample.items() if not k.startswith("__") and k != "json"}
    return rec, members


def _audio_len(data: bytes) -> tuple[int, int]:
    info = sf.info(io.BytesIO(data))
    return info.frames, info.samplerate


def _image_order(rec: dict[str, Any], members: dict[str, bytes]) -> tuple[list[list[str]], list[str]]:
    """Members of each `<image>` (tiles, thumbnail last) and of the video, in order."""
    meta = rec.get("meta") or {}
    tiles = sorted(k for k in members if k.startswith("tile_"))
    frames = sorted(k for k in members if k.startswith("frame_"))
    images = (meta.get("tiling") or {}).get("images")
    if images:
        per = [[f"tile_{i:02d}.jpg" for i in range(im["first_tile"], im["first_tile"] + im["tiles"])]
               for im in images]
    else:
        per = [tiles] if tiles else []
    missing = [m for group in per for m in group if m not in members]
    if missing:
        raise SkipSample(f"tile members missing: {missing[:3]}")
    return per, frames


class Prepared:
    """A sample tokenised, its media still encoded."""

    __slots__ = ("key", "length", "enc", "rec", "members", "images", "frames", "audio")

    def __init__(self, key: str, length: int, enc: Encoded | None, rec: dict[str, Any],
                 members: dict[str, bytes], images: list[list[str]], frames: list[str],
                 audio: list[str]) -> None:
        self.key, self.length, self.enc, self.rec = key, length, enc, rec
        self.members, self.images, self.frames, self.audio = members, images, frames, audio


class StageLoader(torch.utils.data.IterableDataset):
    def __init__(self, shards: list[str], template: ChatTemplate, settings: LoaderSettings,
                 rank: int = 0, world: int = 1, position: dict[int, list[int]] | None = None,
                 rotate: int = 0) -> None:
        super().__init__()
        if settings.kind not in KINDS:
            raise ValueError(f"loader kind must be one of {KINDS}, got {settings.kind!r}")
        self.shards, self.template, self.s = shards, template, settings
        self.rank, self.world = rank, world
        self.position = position or {}
        # The DataLoader takes batches from its workers in turn, starting with worker 0; a run
        # resumed after k steps hands worker w the reader that was due next, (w + k) mod workers.
        self.rotate = rotate
        self.errors = 0
        self._epoch = 0

    # --- reading ----------------------------------------------------------------------------
    def _reader(self) -> tuple[int, int]:
        info = torch.utils.data.get_worker_info()
        workers, wid = (info.num_workers, (info.id + self.rotate) % info.num_workers) if info else (1, 0)
        return self.rank * workers + wid, self.world * workers

    def _handler(self, exn: Exception) -> bool:
        self.errors += 1
        log.warning("skipping unreadable shard data (%d so far): %s", self.errors, exn)
        return True

    def _samples(self, epoch: int, g: int, readers: int) -> Iterator[dict[str, Any]]:
        order = list(self.shards)
        random.Random(f"{self.s.seed}:{epoch}:shards").shuffle(order)
        split = len(order) >= readers
        mine = order[g::readers] if split else order
        stream = wds.tarfile_to_samples(handler=self._handler)(iter([{"url": u} for u in mine]))
        rng = random.Random(f"{self.s.seed}:{epoch}:{g}:shuffle")
        stream = wds.filters.shuffle(self.s.shuffle_buffer, min(self.s.shuffle_buffer, 8), rng=rng)(
            (x for i, x in enumerate(stream) if split or i % readers == g))
        yield from stream

    def prepare(self, sample: dict[str, Any]) -> Prepared:
        rec, members = _group(sample)
        key = sample.get("__key__", rec.get("id", "?"))
        audio = sorted(k for k in members if k.startswith("audio_"))
        kind = self.s.kind
        if kind == "lm":
            images, frames = _image_order(rec, members)
            lens = []
            for a in audio:
                n, sr = _audio_len(members[a])
                if sr != 16000:
                    raise SkipSample(f"{a} is {sr} Hz; speech input must be 16 kHz")
                lens.append(n)
            n_img = sum(1 for t in rec["conversations"] for _ in range(t["value"].count("<image>")))
            if n_img != len(images) or len(lens) != sum(t["value"].count("<audio>")
                                                        for t in rec["conversations"]):
                raise SkipSample("placeholders and media members disagree")
            enc = self.template.encode(rec, [len(x) for x in images], len(frames), lens,
                                       self.s.max_len)
            return Prepared(key, len(enc), enc, rec, members, images, frames, audio)
        if not audio:
            raise SkipSample("no audio member")
        n, sr = _audio_len(members[audio[0]])
        if kind == "ctc":
            if sr != 16000:
                raise SkipSample(f"{audio[0]} is {sr} Hz; the audio encoder takes 16 kHz")
            return Prepared(key, n, None, rec, members, [], [], audio[:1])
        if sr != 24000:
            raise SkipSample(f"{audio[0]} is {sr} Hz; stage-3 speech targets are 24 kHz")
        if kind == "tts" and n > self.s.max_speech:  # cut speech would teach an early end
            raise SkipSample(f"{audio[0]} is {n / sr:.1f} s, over the {self.s.max_speech / sr:.0f} s "
                             "of target speech a step takes")
        length = self.s.codec_segment if kind == "codec" else min(n, self.s.max_speech)
        return Prepared(key, length, None, rec, members, [], [], audio[:1])

    def _prepared(self, epoch: int, g: int, readers: int) -> Iterator[Prepared]:
        for sample in self._samples(epoch, g, readers):
            try:
                yield self.prepare(sample)
            except (SkipSample, KeyError, ValueError, TypeError, AttributeError, RuntimeError,
                    sf.LibsndfileError) as err:  # a malformed record is one skipped sample
                self.errors += 1
                log.warning("skipping sample %s (%d so far): %s", sample.get("__key__"), self.errors, err)

    def _batches(self, epoch: int, g: int, readers: int) -> Iterator[list[Any]]:
        """Length buckets: sort a window of samples by length, cut it into batches, shuffle
        the batches (seeded) so lengths do not rise through the epoch. With packing a batch is
        a list of rows (lists of samples), packed first-fit decreasing from the window."""
        if self.s.pack:
            yield from self._packed_batches(epoch, g, readers)
            return
        bs = self.s.batch_size
        window = bs * self.s.bucket_batches
        rng = random.Random(f"{self.s.seed}:{epoch}:{g}:buckets")
        buf: list[Prepared] = []
        it = self._prepared(epoch, g, readers)
        while True:
            done = False
            for p in it:
                buf.append(p)
                if len(buf) >= window:
                    break
            else:
                done = True
            buf.sort(key=lambda p: (p.length, p.key))
            batches = [buf[i:i + bs] for i in range(0, len(buf), bs)]
            rng.shuffle(batches)
            yield from batches
            buf = []
            if done:
                return

    def _packed_batches(self, epoch: int, g: int, readers: int) -> Iterator[list[list[Prepared]]]:
        bs, cap = self.s.batch_size, self.s.max_len
        budget = bs * self.s.bucket_batches * cap  # a window holds bucket_batches batches of full rows
        rng = random.Random(f"{self.s.seed}:{epoch}:{g}:buckets")
        buf: list[Prepared] = []
        it = self._prepared(epoch, g, readers)
        while True:
            done = False
            tokens = sum(p.length for p in buf)
            for p in it:
                buf.append(p)
                tokens += p.length
                if tokens >= budget:
                    break
            else:
                done = True
            if not buf:
                return
            buf.sort(key=lambda p: p.key)  # the packing depends on the window's contents only
            rows = [[buf[i] for i in r] for r in first_fit_decreasing([p.length for p in buf], cap)]
            batches = [rows[i:i + bs] for i in range(0, len(rows), bs)]
            # a window's last, partly filled batch goes back into the next window
            buf = [p for r in batches.pop() for p in r] if not done and len(batches[-1]) < bs else []
            rng.shuffle(batches)
            yield from batches
            if done:
                return

    def __iter__(self) -> Iterator[dict[str, Any]]:
        g, readers = self._reader()
        start_epoch, skip = self.position.get(g, [0, 0])
        for epoch in count(start_epoch):
            produced = 0  # batches given (or, when resuming, already given) this epoch
            self._epoch = epoch
            for idx, group in enumerate(self._batches(epoch, g, readers)):
                if epoch == start_epoch and idx < skip:
                    produced += 1
                    continue
                try:
                    batch = self.collate(group)
                except (SkipSample, ValueError, RuntimeError, OSError, sf.LibsndfileError) as err:
                    self.errors += 1
                    log.warning("skipping a batch that failed to decode (%d so far): %s", self.errors, err)
                    continue
                produced += 1
                batch.update(reader=g, epoch=epoch, index=idx, errors=self.errors)
                yield batch
            if not produced:
                raise NoShards(f"reader {g} of {readers} got no samples in epoch {epoch}: the stage "
                               f"has fewer usable samples than ranks x workers, or all failed to "
                               "read; lower --num-workers or check the shards")

    # --- decoding and collating -------------------------------------------------------------
    def _jpeg(self, data: bytes) -> np.ndarray:
        arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)  # faster than PIL
        if arr is None:
            raise SkipSample("a tile/frame is not a decodable image")
        arr = cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)
        size = self.s.image_size
        if arr.shape[:2] != (size, size):
            raise SkipSample(f"a tile/frame is {arr.shape[1]}x{arr.shape[0]}, expected {size}x{size}")
        return arr

    @staticmethod
    def _wav(data: bytes) -> np.ndarray:
        x, _ = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
        return x.mean(1)

    @staticmethod
    def _pad_audio(clips: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        n = max((len(c) for c in clips), default=0)
        out = torch.zeros(len(clips), n)
        for i, c in enumerate(clips):
            out[i, : len(c)] = torch.from_numpy(c)
        return out, torch.tensor([len(c) for c in clips], dtype=torch.long)

    def collate(self, group: list[Any]) -> dict[str, Any]:
        """A batch from a group of samples (with packing: a list of rows of samples)."""
        kind = self.s.kind
        if kind == "lm":
            return self._collate_lm(group if self.s.pack else [[p] for p in group])
        clips, kept = [], []
        for p in group:  # an undecodable clip drops its sample, not the batch
            try:
                clips.append(self._wav(p.members[p.audio[0]]))
                kept.append(p)
            except (OSError, ValueError, RuntimeError, sf.LibsndfileError) as err:
                self.errors += 1
                log.warning("skipping sample %s (%d so far): %s", p.key, self.errors, err)
        if not kept:
            raise SkipSample("no sample of the batch decoded")
        group = kept
        samples = [p.key for p in group]
        if kind == "ctc":
            audio, lengths = self._pad_audio(clips)
            targets = [self.template.text(self._answer(p.rec)) for p in group]
            return {"kind": kind, "audio": audio, "audio_lengths": lengths,
                    "targets": torch.tensor([t for ts in targets for t in ts], dtype=torch.long),
                    "target_lengths": torch.tensor([len(t) for t in targets], dtype=torch.long),
                    "tokens": int(sum(len(t) for t in targets)), "samples": samples}
        if kind == "codec":
            seg = self.s.codec_segment
            out = torch.zeros(len(group), seg)
            for i, (p, c) in enumerate(zip(group, clips, strict=True)):
                rng = random.Random(f"{self.s.seed}:{self._epoch}:{p.key}")  # a new crop each epoch
                start = rng.randrange(max(1, len(c) - seg + 1))
                piece = c[start:start + seg]
                out[i, : len(piece)] = torch.from_numpy(piece)
            return {"kind": kind, "speech": out, "samples": samples,
                    "tokens": len(group) * codec_frames(seg, self.s.codec_hop)}
        speech, lengths = self._pad_audio(clips)
        texts = [self.template.text(self._speech_text(p.rec))[: self.s.max_len] or
                 [self.template.ids[PAD]] for p in group]
        ids, mask = self._pad_ids(texts, self.template.ids[PAD])
        hop = self.s.codec_hop
        return {"kind": kind, "input_ids": ids, "attention_mask": mask, "speech": speech,
                "code_lengths": torch.tensor([codec_frames(int(n), hop) for n in lengths]),
                "tokens": int(sum(codec_frames(int(n), hop) for n in lengths)), "samples": samples}

    @staticmethod
    def _answer(rec: dict[str, Any]) -> str:
        return " ".join(t["value"] for t in rec["conversations"] if t["from"] == "gpt").strip()

    @staticmethod
    def _speech_text(rec: dict[str, Any]) -> str:
        target = (rec.get("meta") or {}).get("speech_target") or {}
        return target.get("text") or " ".join(
            t["value"] for t in rec["conversations"] if t["from"] == "human").strip()

    @staticmethod
    def _pad_ids(seqs: list[list[int]], pad: int,
                 fill: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        n = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), n), pad if fill is None else fill, dtype=torch.long)
        mask = torch.zeros(len(seqs), n, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, : len(s)] = 1
        return ids, mask

    def _decode_lm(self, p: Prepared) -> tuple[list[np.ndarray], list[np.ndarray]]:
        tiles: list[np.ndarray] = []
        img = iter(p.images)
        for turn in p.rec["conversations"]:
            for tok in _VISUAL.findall(turn["value"]):
                names = next(img) if tok == "<image>" else p.frames
                tiles.extend(self._jpeg(p.members[n]) for n in names)
        return tiles, [self._wav(p.members[a]) for a in p.audio]

    def _collate_lm(self, rows: list[list[Prepared]]) -> dict[str, Any]:
        tiles: list[np.ndarray] = []
        clips: list[np.ndarray] = []
        kept: list[list[Prepared]] = []
        for row in rows:
            kept_row = []
            for p in row:  # a sample whose media fail to decode is dropped (and counted), not the batch
                try:
                    t, c = self._decode_lm(p)
                except (SkipSample, OSError, ValueError, sf.LibsndfileError) as err:
                    self.errors += 1
                    log.warning("skipping sample %s (%d so far): %s", p.key, self.errors, err)
                    continue
                tiles += t  # row by row, sample by sample: the order of the placeholders
                clips += c
                kept_row.append(p)
            if kept_row:
                kept.append(kept_row)
        if not kept:
            raise SkipSample("no sample of the batch decoded")
        pad = self.template.ids[PAD]
        ids, _ = self._pad_ids([[t for p in row for t in p.enc.input_ids] for row in kept], pad)
        labels, _ = self._pad_ids([[t for p in row for t in p.enc.labels] for row in kept], pad,
                                  fill=IGNORE)
        layout = row_layout([[len(p.enc) for p in row] for row in kept])
        mask = layout["attention_mask"]
        flat = [p for row in kept for p in row]
        starts = layout["spans"][:, 1].tolist()
        rows_of = layout["spans"][:, 0].tolist()
        state_index = [(r, s + pos) for p, r, s in zip(flat, rows_of, starts, strict=True)
                       for pos in p.enc.state_positions]
        state_labels = [lab for p in flat for lab in p.enc.state_labels]
        audio, lengths = self._pad_audio(clips)
        tile_t = (torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).contiguous() if tiles
                  else torch.zeros(0, 3, self.s.image_size, self.s.image_size, dtype=torch.uint8))
        batch = {"kind": "lm", "input_ids": ids, "labels": labels, "attention_mask": mask,
                 "tiles": tile_t, "audio": audio, "audio_lengths": lengths,
                 "state_index": torch.tensor(state_index, dtype=torch.long).view(-1, 2),
                 "state_labels": torch.tensor(state_labels, dtype=torch.long),
                 "spans": layout["spans"], "tokens": int(mask.sum()), "slots": mask.numel(),
                 "padding": float(1 - mask.float().mean()), "samples": [p.key for p in flat]}
        if any(len(row) > 1 for row in kept):  # packed: per-sample positions, block-diagonal attention
            batch["position_ids"] = layout["position_ids"]
        return batch
