"""Audio parts: every source and container gives the same mono samples and hash, resampling
keeps the signal, bad clips are ValueErrors naming the part, and the pipeline expands audio
placeholders next to image ones (or refuses audio for a model that cannot hear)."""
import base64
import io
import types

import attrs
import numpy as np
import pytest
import soundfile

from mistralrs_arch_vision.audio import resample
from mistralrs_arch_vision.inputs import LoadedAudio, audio_url_of, decode_audio, load_audio
from mistralrs_arch_vision.pipeline import ImagePrompt, VisionPipeline

WHERE = "messages[0].content[0].audio_url"


def tone(rate=16000, seconds=0.25, freq=440.0, channels=1) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    mono = (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return mono if channels == 1 else np.stack([mono, -0.5 * mono], axis=1)


def encode(samples, rate, fmt, subtype=None) -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, samples, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def test_every_source_gives_the_same_samples_and_hash(tmp_path):
    wav = encode(tone(), 16000, "WAV", "FLOAT")
    path = tmp_path / "a.wav"
    path.write_bytes(wav)
    b64 = base64.b64encode(wav).decode()
    loaded = [load_audio(s, where=WHERE) for s in ("data:audio/wav;base64," + b64, b64, str(path), path.as_uri())]
    assert all(isinstance(x, LoadedAudio) and x.rate == 16000 and x.samples.dtype == np.float32 for x in loaded)
    assert len({x.content_hash for x in loaded}) == 1
    np.testing.assert_array_equal(loaded[0].samples, tone())
    # FLAC is lossless at 16 bits: the same samples as a 16-bit WAV, so the same hash.
    # (Integers in, so the two writers' float rounding does not differ.)
    ints = (tone() * 32767).astype(np.int16)
    pcm16 = encode(ints, 16000, "WAV", "PCM_16")
    flac = encode(ints, 16000, "FLAC", "PCM_16")
    assert decode_audio(pcm16, WHERE).content_hash == decode_audio(flac, WHERE).content_hash
    ogg = decode_audio(encode(tone(), 16000, "OGG", "VORBIS"), WHERE)
    assert ogg.rate == 16000 and abs(ogg.seconds - 0.25) < 0.01
    if "MP3" in soundfile.available_formats():         # libsndfile >= 1.1
        mp3 = decode_audio(encode(tone(), 16000, "MP3"), WHERE)
        assert mp3.rate == 16000 and abs(mp3.seconds - 0.25) < 0.01
        assert np.abs(mp3.samples).max() > 0.1
    assert decode_audio(encode(tone(freq=880.0), 16000, "WAV", "FLOAT"), WHERE).content_hash != loaded[0].content_hash


def test_stereo_is_averaged_and_openai_input_audio_is_read():
    stereo = tone(channels=2)
    got = decode_audio(encode(stereo, 22050, "WAV", "FLOAT"), WHERE)
    np.testing.assert_allclose(got.samples, stereo.mean(axis=1), atol=1e-7)
    part = {"type": "input_audio", "input_audio": {"data": base64.b64encode(b"xyz").decode(), "format": "wav"}}
    assert audio_url_of(part, "p") == base64.b64encode(b"xyz").decode()
    assert audio_url_of({"type": "audio_url", "audio_url": {"url": "u"}}, "p") == "u"
    with pytest.raises(ValueError, match="^p: expected"):
        audio_url_of({"type": "input_audio", "input_audio": {"format": "wav"}}, "p")


def test_resample_keeps_the_tone():
    src = tone(rate=44100, seconds=0.5, freq=1000.0)
    out = resample(src, 44100, 16000)
    assert out.dtype == np.float32 and abs(len(out) - 8000) <= 1
    spectrum = np.abs(np.fft.rfft(out[1000:7000]))
    peak_hz = np.argmax(spectrum) * 16000 / 6000
    assert abs(peak_hz - 1000.0) < 3.0
    assert resample(src, 16000, 16000) is src
    with pytest.raises(ValueError, match="positive"):
        resample(src, 0, 16000)


@pytest.mark.parametrize("data, why", [
    (b"this is not audio at all", "not a decodable audio file"),
    (encode(tone(), 16000, "WAV", "PCM_16")[:30], "not a decodable audio file"),
    (encode(np.zeros(0, np.float32), 16000, "WAV", "FLOAT"), "no samples"),
    (encode(np.full(16, np.nan, np.float32), 16000, "WAV", "FLOAT"), "NaN"),
])
def test_bad_clips_are_value_errors_naming_the_part(data, why):
    with pytest.raises(ValueError) as info:
        load_audio(base64.b64encode(data).decode(), where=WHERE)
    assert str(info.value).startswith(WHERE + ": ") and why in str(info.value)


def test_size_limit():
    data = encode(tone(), 16000, "WAV", "FLOAT")
    with pytest.raises(ValueError, match="limit"):
        load_audio(base64.b64encode(data).decode(), where=WHERE, max_bytes=len(data) - 1)


@attrs.define
class _Hearing:
    """A processor with 2 tokens per image and one token per 0.1 s of audio."""
    image_token_id: int = 7
    audio_token_id: int = 8
    image_part: dict = attrs.field(factory=lambda: {"type": "image"})

    def prepare(self, image):
        return ImagePrompt(2, ("img", image.size))

    def prepare_audio(self, audio):
        return ImagePrompt(max(1, round(audio.seconds * 10)), ("audio", audio.rate))


def test_pipeline_expands_audio_and_image_placeholders_in_order():
    from PIL import Image
    pipe = VisionPipeline.__new__(VisionPipeline)
    pipe.processor = _Hearing()
    img = types.SimpleNamespace(image=Image.new("RGB", (3, 3)), content_hash=b"i")
    clip = decode_audio(encode(tone(seconds=0.3), 16000, "WAV", "FLOAT"), WHERE)
    prompt = pipe.expand_media([1, 8, 2, 7, 3], [img], [clip])
    assert prompt.ids == [1, 8, 8, 8, 2, 7, 7, 3]
    assert [(s.start, s.length, s.data[0]) for s in prompt.spans] == [(1, 3, "audio"), (5, 2, "img")]
    assert prompt.spans[0].content_hash == clip.content_hash
    with pytest.raises(ValueError, match="1 audio placeholder"):
        pipe.expand_media([1, 8, 2], [], [clip, clip])
