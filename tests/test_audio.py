import io

import numpy as np
import pytest
import soundfile as sf

from schemas.params import AudioConfig
from schemas.rejects import Rejected
from transforms.audio import encode_flac, load_audio

from conftest import ffmpeg


def tone(seconds, sr, channels=1, amp=0.3, freq=440.0):
    t = np.arange(int(seconds * sr)) / sr
    x = amp * np.sin(2 * np.pi * freq * t)
    return np.stack([x] * channels, axis=1) if channels > 1 else x


def encode(x, sr, fmt, subtype=None):
    buf = io.BytesIO()
    sf.write(buf, x, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


@pytest.mark.parametrize("sr,channels,fmt", [(44100, 2, "WAV"), (48000, 1, "FLAC"),
                                             (22050, 1, "OGG"), (8000, 1, "WAV"),
                                             (16000, 1, "FLAC")])
def test_any_rate_and_layout_becomes_16k_mono(sr, channels, fmt):
    a = load_audio(encode(tone(2.0, sr, channels), sr, fmt))
    assert a.sample_rate == 16000 and a.samples.ndim == 1
    assert a.duration_s == pytest.approx(2.0, abs=0.01)
    assert a.source_rate == sr and a.source_channels == channels
    # The tone survives resampling: its frequency is still 440 Hz.
    spec = np.abs(np.fft.rfft(a.samples))
    assert np.argmax(spec) * 16000 / a.samples.size == pytest.approx(440, abs=2)


def test_24k_targets_for_stage_3():
    a = load_audio(encode(tone(1.5, 44100), 44100, "WAV"), AudioConfig(sample_rate=24000))
    assert a.sample_rate == 24000 and a.samples.size == 36000


def test_mp3_and_m4a(tmp_path):
    sf.write(tmp_path / "a.wav", tone(2.0, 44100), 44100)
    ffmpeg("-i", str(tmp_path / "a.wav"), "-c:a", "libmp3lame", str(tmp_path / "a.mp3"))
    ffmpeg("-i", str(tmp_path / "a.wav"), "-c:a", "aac", str(tmp_path / "a.m4a"))
    for name in ("a.mp3", "a.m4a"):
        a = load_audio((tmp_path / name).read_bytes())
        assert a.sample_rate == 16000 and a.duration_s == pytest.approx(2.0, abs=0.1), name
        assert a.source_rate == 44100 and a.source_channels == 1, name


@pytest.mark.parametrize("channels", [2, 6])
def test_ffmpeg_decoded_audio_records_its_source_layout(tmp_path, channels):
    # AAC in an mp4 container goes through ffmpeg, not libsndfile: its rate and channel
    # count must still be the source's, not the target's (and never 0).
    sf.write(tmp_path / "a.wav", tone(2.0, 48000, channels), 48000)
    ffmpeg("-i", str(tmp_path / "a.wav"), "-c:a", "aac", str(tmp_path / "a.mp4"))
    a = load_audio((tmp_path / "a.mp4").read_bytes())
    assert (a.source_rate, a.source_channels) == (48000, channels)
    assert a.meta()["source_channels"] == channels


def reason(data, cfg=AudioConfig()):
    with pytest.raises(Rejected) as e:
        load_audio(data, cfg)
    return e.value.reason


def test_bounds_silence_and_garbage():
    assert reason(encode(tone(0.3, 16000), 16000, "WAV")) == "audio_too_short"
    assert reason(encode(tone(31, 16000), 16000, "FLAC")) == "audio_too_long"
    assert reason(encode(np.zeros(16000), 16000, "WAV")) == "audio_silent"
    assert reason(b"") == "empty_file"
    assert reason(b"RIFF" + bytes(100)) == "audio_decode_error"
    ok = load_audio(encode(tone(31, 16000), 16000, "FLAC"), AudioConfig(max_s=60))
    assert ok.duration_s == pytest.approx(31)


def test_flac_member_round_trips():
    a = load_audio(encode(tone(1.0, 48000, 2), 48000, "WAV"))
    data = encode_flac(a)
    info = sf.info(io.BytesIO(data))
    assert (info.format, info.samplerate, info.channels, info.frames) == ("FLAC", 16000, 1, 16000)
    back, _ = sf.read(io.BytesIO(data), dtype="float32")
    assert np.max(np.abs(back - a.samples)) < 1e-3
    assert a.tokens == 13  # 1 s at 12.5 Hz, rounded up
    assert a.meta()["rms_dbfs"] == pytest.approx(20 * np.log10(0.3 / np.sqrt(2)), abs=0.2)


def test_config_refuses_bad_bounds():
    with pytest.raises(ValueError, match="min_s < max_s"):
        AudioConfig(min_s=5, max_s=1)
