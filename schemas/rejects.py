"""Named rejections: an expected drop carries a reason slug that becomes a report counter."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

# Every slug the pipeline emits, with what a person should read it as. The report and the
# reject store use the slug; the text is for `vita-corpus report` and the docs.
REASONS: dict[str, str] = {
    "malformed_json": "the record is not valid JSON",
    "json_too_deep": "the JSON element nests deeper than limits.json_max_depth",
    "element_too_large": "the JSON element or line is larger than limits.json_max_element_mb "
                         "(skipped; the reader goes on with the next one)",
    "invalid_utf8": "the text is not valid UTF-8",
    "not_an_object": "the JSON value is not an object",
    "bad_record": "a record field has the wrong type",
    "missing_conversations": "the record has no `conversations` list",
    "bad_conversations": "`conversations` is not a list of {from: human|gpt, value: str} turns",
    "bad_media_field": "`image`, `video` or `audio` has the wrong type",
    "placeholder_mismatch": "<image>/<video>/<audio> placeholders do not match the attached media",
    "duplicate_id": "an earlier record of the same source (or sample of the stage) has the same id",
    "duplicate_content": "an earlier sample (first source in config order, then input order) has "
                         "the same normalised conversation and the same media bytes",
    "near_duplicate": "the conversation text is a near-duplicate (Jaccard of the word shingles "
                      "at or above dedupe.near_text.threshold) of an earlier sample's",
    "near_duplicate_image": "an image is a near-duplicate (pHash within "
                            "dedupe.near_image.max_distance bits, other bytes) of an earlier "
                            "sample's image (dedupe.near_image.action: reject)",
    "eval_contamination": "the sample shares a dedupe.ngram-token n-gram with an item of a "
                          "benchmark named in dedupe.benchmarks",
    "bad_turn_order": "turns are not human first, alternating human/gpt, ending with gpt",
    "empty_turn": "a turn has no text",
    "too_many_tokens": "the sample is longer than sample.max_tokens (estimated tokens)",
    "sample_unreadable": "the gate found a sample without a readable JSON member",
    "member_mismatch": "the gate found tile/frame/audio members that do not match the "
                       "placeholders and meta",
    "bad_tile_count": "the gate found an image with a tile count outside 1..max_num+1",
    "bad_media_size": "the gate found a tile or frame that is not image_size square",
    "bad_frame_count": "the gate found a frame count outside the paper's rule",
    "bad_sample_rate": "the gate found audio at the wrong sample rate",
    "missing_text": "the transcription text is empty",
    "unsupported_role": "a message's role is not user, assistant or system (a tool result, a "
                        "function or tool call)",
    "unmappable_content": "a message cannot become a VITA turn: an unknown content part, media "
                          "in an assistant turn, a URL or inline data instead of a file, a system "
                          "message after the conversation began",
    "media_part_without_file": "an image, video or audio content part names no file",
    "null_media": "the row's media cell is null, or holds neither bytes nor a path",
    "missing_column": "a column the parquet preset or `columns` names is not in the file "
                      "(every row of the file is rejected)",
    "row_group_too_large": "a parquet row group decodes to more than "
                           "limits.parquet_max_row_group_mb (every row of it is rejected)",
    "bad_container": "a parquet file or tar cannot be read from here on (a bad footer, a corrupt "
                     "header): the rest of the file is one input",
    "path_outside_root": "a media path is absolute or escapes the media root",
    "missing_media": "a media file does not exist",
    "not_a_file": "a media file, transcript or manifest is not a regular file (a FIFO, a device, "
                  "a socket)",
    "unreadable_file": "a file cannot be opened (permissions, a symlink loop, a name too long)",
    "file_too_large": "a file is larger than its kind's limit (limits.max_file_mb)",
    "empty_file": "a media file has zero bytes",
    "image_decode_error": "the image cannot be decoded (truncated or corrupt)",
    "image_too_large": "the image header claims more pixels, or more decoded bytes, than allowed "
                       "(decompression bomb)",
    "audio_decode_error": "the audio cannot be decoded",
    "video_decode_error": "the video cannot be decoded",
    "video_truncated": "the video ends before the frames its header promises",
    "no_video_stream": "the file holds no video stream (audio only?)",
    "video_too_short": "the video has no duration",
    "video_too_long": "the container claims more frames or seconds than limits.video_max_frames "
                      "/ video_max_s",
    "video_too_large": "a video frame would decode to more bytes than limits.image_max_decoded_mb",
    "audio_too_short": "the audio is shorter than the configured minimum",
    "audio_too_long": "the audio is longer than the configured maximum (from its header, or "
                      "when decoding reaches it)",
    "audio_too_large": "decoding the audio would take more than limits.audio_max_decoded_mb",
    "audio_silent": "the audio is silence",
    "tts_failed": "the TTS backend raised or returned no audio",
    "empty_text": "the text to speak is empty or whitespace",
    # Speech gate (transforms.speech_gate): a synthesized question that fails stays text.
    "tts_silent": "the synthesized speech is mostly or wholly silence",
    "tts_clipped": "the synthesized speech clips (too many samples at full scale)",
    "tts_level": "the level of the synthesized speech is outside speech.gate.level_dbfs",
    "tts_too_fast": "the synthesized speech is too short for its text (below s_per_char)",
    "tts_too_slow": "the synthesized speech is too long for its text (above s_per_char)",
    "tts_wer_high": "the ASR round trip's word (or character) error rate is above asr_max_error",
    # Not an expected drop: a bug, or an input nobody foresaw. The input is rejected with the
    # exception, the build goes on, and it exits 1 with the count.
    "internal_error": "reading or transforming this input raised an unexpected error (the "
                      "detail has the exception); the build goes on and exits 1",
}


class Rejected(Exception):
    """An expected drop of one input record; `reason` is a slug from REASONS."""

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown reject reason {reason!r}; add it to schemas.rejects.REASONS")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class RejectRecord(BaseModel):
    """One line of the reject store: which input, from where, and why."""

    source: str
    index: int = Field(description="position of the input in its source (0-based)")
    lineage: str = Field(description="file and line/element of the input")
    reason: str
    detail: str = ""
    id: str | None = None
    raw: str | None = Field(default=None, description="the input text, cut to 2 kB")

    @classmethod
    def from_rejection(
        cls,
        err: Rejected,
        *,
        source: str,
        index: int,
        lineage: str,
        record_id: str | None = None,
        raw: str | None = None,
    ) -> RejectRecord:
        return cls(
            source=source,
            index=index,
            lineage=lineage,
            reason=err.reason,
            detail=err.detail[:1000],
            id=record_id,
            # Invalid bytes (kept as surrogates) become U+FFFD so the store stays valid UTF-8;
            # the lineage points at the untouched input.
            raw=raw[:2048].encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            if raw is not None else None,
        )

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)
