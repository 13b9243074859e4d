"""VITA's chat template, placeholder expansion and the tokenizer.

A record's conversation becomes Qwen2 chat text (`<|im_start|>user ... <|im_end|>`); each
`<image>` expands to tokens_per_tile image tokens per tile (a video's frames likewise, in
order), each `<audio>` to one audio token per 80 ms of its clip (12.5 Hz, the rate the audio
adapter emits). Loss falls on the assistant's answers (and their `<|im_end|>`) only. The end of
every user turn is where the state head reads whether that question was spoken or typed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

IGNORE = -100
IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
IMAGE, AUDIO, PAD = "<image>", "<audio>", "<pad>"
SPECIAL = [ENDOFTEXT, IM_START, IM_END, IMAGE, AUDIO, PAD]
SYSTEM = "You are an AI robot and your name is VITA."
_PLACEHOLDER = re.compile(r"(<image>|<video>|<audio>)")

FBANK_HOP = 160  # 10 ms at 16 kHz
FBANK_WIN = 400  # 25 ms at 16 kHz


def fbank_frames(num_samples: int) -> int:
    return max(1, 1 + (num_samples - FBANK_WIN) // FBANK_HOP) if num_samples >= FBANK_WIN else 1


def _half(n: int) -> int:  # a stride-2 conv with kernel 3, padding 1
    return (n + 1) // 2


def encoder_frames(num_samples: int) -> int:
    """Audio-encoder outputs (25 Hz, after the 4x conv downsampling) for a 16 kHz clip."""
    return _half(_half(fbank_frames(num_samples)))


def audio_tokens(num_samples: int) -> int:
    """LLM tokens for a 16 kHz clip: the adapter's 2x conv gives 12.5 Hz."""
    return _half(encoder_frames(num_samples))


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE over `texts`, with our special tokens; any text still encodes."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A `tokenizer.json` (or a folder holding one, e.g. a Qwen2 checkpoint), plus our specials."""
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise FileNotFoundError(f"no tokenizer.json at {path}; give a tokenizer folder or file, "
                                "or leave tokenizer_path unset to train a BPE on the stage's text")
    tok = Tokenizer.from_file(str(p))
    tok.add_special_tokens([s for s in SPECIAL if tok.token_to_id(s) is None])
    return tok


class TooLong(ValueError):
    """A sample that cannot be cut to max_len without losing its media or its whole answer."""


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    state_positions: list[int] = field(default_factory=list)  # end of each user turn
    state_labels: list[int] = field(default_factory=list)  # 1 spoken, 0 typed
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)


class ChatTemplate:
    """Turns a record (and its media counts) into token ids, labels and state targets."""

    def __init__(self, tokenizer: Tokenizer, tokens_per_tile: int, system: str = SYSTEM) -> None:
        self.tok = tokenizer
        self.tokens_per_tile = tokens_per_tile
        self.system = system
        self.ids = {s: tokenizer.token_to_id(s) for s in SPECIAL}
        missing = [s for s, i in self.ids.items() if i is None]
        if missing:
            raise ValueError(f"tokenizer lacks the special tokens {missing}; load it with "
                             "training.template.load_tokenizer")

    def text(self, s: str) -> list[int]:
        return self.tok.encode(s, add_special_tokens=False).ids if s else []

    def encode(self, record: dict[str, Any], tiles: list[int], frames: int,
               audio_samples: list[int], max_len: int | None = None) -> Encoded:
        """tiles: tiles per `<image>` in order; frames: the video's frame count; audio_samples:
        16 kHz length of each `<audio>` clip in order."""
        spoken = {q["turn"] for q in (record.get("meta") or {}).get("speech", {}).get("questions", [])}
        img, aud = iter(tiles), iter(audio_samples)
        ids: list[int] = []
        labels: list[int] = []
        enc = Encoded(ids, labels)

        def add(tokens: list[int], train: bool) -> None:
            ids.extend(tokens)
            labels.extend(tokens if train else [IGNORE] * len(tokens))

        add([self.ids[IM_START]] + self.text(f"system\n{self.system}") + [self.ids[IM_END]]
            + self.text("\n"), False)
        for i, turn in enumerate(record["conversations"]):
            human = turn["from"] == "human"
            add([self.ids[IM_START]] + self.text("user\n" if human else "assistant\n"), False)
            for part in _PLACEHOLDER.split(turn["value"]):
                if part == "<image>":
                    add([self.ids[IMAGE]] * (next(img) * self.tokens_per_tile), False)
                elif part == "<video>":
                    add([self.ids[IMAGE]] * (frames * self.tokens_per_tile), False)
                elif part == "<audio>":
                    add([self.ids[AUDIO]] * audio_tokens(next(aud)), False)
                else:
                    add(self.text(part), not human)
            if human:
                enc.state_positions.append(len(ids))
                enc.state_labels.append(int(i in spoken))
            add([self.ids[IM_END]], not human)
            add(self.text("\n"), False)
        if max_len is not None and len(ids) > max_len:
            media = {self.ids[IMAGE], self.ids[AUDIO]}
            last_media = max((k for k, t in enumerate(ids) if t in media), default=-1)
            if last_media >= max_len:
                raise TooLong(f"{len(ids)} tokens, and its media alone reach past max_len {max_len}; "
                              "raise --max-len (13 tiles x 256 tokens need 3,328)")
            if all(lab == IGNORE for lab in labels[:max_len]):
                raise TooLong(f"{len(ids)} tokens; cut at max_len {max_len} no answer token is left")
            enc.truncated = True
            del ids[max_len:], labels[max_len:]
            keep = [k for k, p in enumerate(enc.state_positions) if p < max_len]
            enc.state_positions = [enc.state_positions[k] for k in keep]
            enc.state_labels = [enc.state_labels[k] for k in keep]
        return enc

    def feature_counts(self, enc: Encoded) -> tuple[int, int]:
        """(image tokens, audio tokens) in an encoded sample."""
        return (sum(1 for t in enc.input_ids if t == self.ids[IMAGE]),
                sum(1 for t in enc.input_ids if t == self.ids[AUDIO]))


def ctc_target(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids


def codec_frames(num_samples: int, hop: int) -> int:
    return math.ceil(num_samples / hop)
