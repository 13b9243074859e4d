import pytest

from schemas.params import VideoConfig
from schemas.rejects import Rejected
from transforms.tiling import psnr
from transforms.video import mp4_facts, sample_frames, sample_times


@pytest.mark.parametrize("duration,expected", [
    (1, [0.125, 0.375, 0.625, 0.875]),
    (3.99, [0.49875, 1.49625, 2.49375, 3.49125]),
    (4, [0.5, 1.5, 2.5, 3.5]),
    (10, [i + 0.5 for i in range(10)]),
    (16, [i + 0.5 for i in range(16)]),
    (16.01, [round((i + 0.5) * 16.01 / 16, 6) for i in range(16)]),
    (60, [(i + 0.5) * 3.75 for i in range(16)]),
])
def test_sample_times_follow_the_paper(duration, expected):
    assert sample_times(duration) == pytest.approx(expected)


def test_sample_times_counts_and_bounds():
    for d in (0.1, 1, 3.99, 4, 4.5, 9.99, 15.2, 16, 16.01, 100, 3600):
        t = sample_times(d)
        assert len(t) == (4 if d < 4 else 16 if d > 16 else int(d))
        assert all(0 < x < d for x in t) and t == sorted(t)
    with pytest.raises(ValueError):
        sample_times(0)


def frames_of(path, **kw):
    return sample_frames(path.read_bytes(), VideoConfig(**kw))


def test_short_clip_gives_four_448_frames(clips):
    f = frames_of(clips["2s"])
    assert len(f.frames) == 4 and all(im.size == (448, 448) for im in f.frames)
    assert f.times == [0.25, 0.75, 1.25, 1.75]
    # The frame shown at t starts at or before t and within one frame interval (25 fps).
    assert all(0 <= t - ft < 0.04 + 1e-6 for t, ft in zip(f.times, f.frame_times, strict=True))


def test_60s_720p_clip_gives_16_frames_at_the_right_times(clips):
    f = frames_of(clips["60s_720p"])
    assert len(f.frames) == 16 and f.duration_s == pytest.approx(60, abs=0.05)
    assert f.times == pytest.approx([(i + 0.5) * 3.75 for i in range(16)], abs=0.01)
    assert all(0 <= t - ft < 0.04 + 1e-6 for t, ft in zip(f.times, f.frame_times, strict=True))
    # Seeking gives the same pixels as the ffmpeg path that decodes to the same instant.
    ref = frames_of(clips["60s_720p"], backend="ffmpeg")
    assert min(psnr(a, b) for a, b in zip(f.frames, ref.frames, strict=True)) > 30


def test_1fps_range(clips):
    f = frames_of(clips["10s"])
    assert len(f.frames) == 10 and f.times == [i + 0.5 for i in range(10)]


def test_variable_frame_rate_uses_real_timestamps(clips):
    f = frames_of(clips["vfr"])
    assert f.duration_s == pytest.approx(5, abs=0.05)
    assert f.times == [0.5, 1.5, 2.5, 3.5, 4.5]
    # In the 10 fps part a frame lasts 0.1 s, in the 30 fps part 1/30 s.
    gaps = [t - ft for t, ft in zip(f.times, f.frame_times, strict=True)]
    assert all(0 <= g < 0.1 + 1e-6 for g in gaps[:2]) and all(0 <= g < 1 / 30 + 1e-6 for g in gaps[2:])


def test_rotation_metadata_is_applied_like_ffmpeg_does(clips):
    data = clips["rotated"].read_bytes()
    assert mp4_facts(data).rotation in (90, 270)
    ours = sample_frames(data)
    ref = sample_frames(data, VideoConfig(backend="ffmpeg"))
    assert ours.rotation in (90, 270)
    assert min(psnr(a, b) for a, b in zip(ours.frames, ref.frames, strict=True)) > 30


def test_keyframe_mode_snaps_to_keyframes(clips):
    f = frames_of(clips["10s"], mode="keyframe")  # a keyframe every second
    assert len(f.frames) == 10 and f.mode == "keyframe"
    # Keyframes sit on whole seconds; each time lies half-way, and the earlier one is taken.
    assert f.frame_times == pytest.approx([float(i) for i in range(10)], abs=1e-3)
    assert all(abs(ft - t) <= 0.5 + 1e-6 for t, ft in zip(f.times, f.frame_times, strict=True))


def test_moov_at_the_end_decodes(clips):
    assert len(frames_of(clips["moov_last"]).frames) == 6


def reason(data, **kw):
    with pytest.raises(Rejected) as e:
        sample_frames(data, VideoConfig(**kw))
    return e.value.reason


def test_audio_only_zero_length_and_garbage_reject(clips):
    assert reason(clips["audio_only"].read_bytes()) == "no_video_stream"
    assert reason(b"") == "empty_file"
    assert reason(b"\0\0\0\x18ftypisom" + bytes(500)) in ("video_decode_error", "video_truncated")


def test_truncated_faststart_mp4_is_caught(clips):
    data = clips["60s_720p"].read_bytes()
    # The index is at the front, so decoders open the cut file happily; its boxes give it away.
    assert mp4_facts(data[: len(data) // 2]).truncated_by > 0
    assert reason(data[: len(data) // 2]) == "video_truncated"
    assert reason(data[: len(data) - 1000]) == "video_truncated"


def test_truncated_moov_last_mp4_rejects(clips):
    data = clips["moov_last"].read_bytes()
    assert reason(data[: len(data) // 2]) in ("video_truncated", "video_decode_error")


def test_ffmpeg_backend_agrees_on_times(clips):
    f = frames_of(clips["2s"], backend="ffmpeg")
    assert f.backend == "ffmpeg" and f.times == [0.25, 0.75, 1.25, 1.75]
    assert all(im.size == (448, 448) for im in f.frames)


def test_config_refuses_unknown_mode():
    with pytest.raises(ValueError, match="mode"):
        VideoConfig(mode="fast")


@pytest.mark.parametrize("backend", ["decord", "ffmpeg"])
def test_clip_shorter_than_the_frame_spacing_says_its_frames_repeat(tmp_path, backend):
    from conftest import clip

    # 2 frames at 25 fps (0.08 s): the rule's 4 times fall on at most 2 distinct frames.
    path = clip(tmp_path / "tiny.mp4", 0.08)
    f = frames_of(path, backend=backend)
    meta = f.meta()
    assert len(f.frames) == 4 and meta["distinct_frames"] <= 2
    assert "distinct source frame" in meta["repeated_frames"]


def test_ordinary_clip_has_no_repeated_frames(clips):
    meta = frames_of(clips["10s"]).meta()
    assert meta["distinct_frames"] == 10 and "repeated_frames" not in meta
