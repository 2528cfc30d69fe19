"""Images, audio and video from chat ``image_url`` / ``audio_url`` / ``input_audio`` /
``video_url`` parts: every source the SDK accepts, decoded to RGB pixels, mono float samples
or RGB frames.

A part's ``url`` may be a ``data:`` URI, raw base64, a local file path, a ``file://`` URL
or an http(s) URL. Whatever the source, the result is the same RGB pixels (EXIF
orientation applied, optionally capped by ``max_edge``) and a content hash over those
pixels, so the same picture sent two ways shares the prefix cache. Every failure is a
``ValueError`` whose message starts with the part's name (the server turns the prefix into
the error's ``param``).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings

import attrs
import numpy as np
from PIL import Image, ImageOps

#: Largest encoded image accepted from any source (bytes).
MAX_IMAGE_BYTES = 32 * 1024 * 1024
#: Largest encoded audio clip accepted from any source (bytes): ~6 min of 16-bit 44.1 kHz stereo.
MAX_AUDIO_BYTES = 64 * 1024 * 1024
#: Largest encoded video accepted from any source (bytes).
MAX_VIDEO_BYTES = 256 * 1024 * 1024
#: Most frames a video may hold once sampled (transformers' Qwen2-VL ``max_frames``).
MAX_VIDEO_FRAMES = 768
#: Seconds an http(s) fetch may take to connect and between reads.
FETCH_TIMEOUT_S = 10.0


@attrs.frozen
class LoadedImage:
    image: Image.Image            # RGB, orientation applied
    content_hash: bytes           # blake2b-256 of (width, height, RGB bytes)


def pixel_digest(image: Image.Image) -> bytes:
    """A digest of what the model sees, not of the encoded file: a PNG and a re-encoded
    PNG of the same pixels (or the same file by path and by URL) hash equal."""
    h = hashlib.blake2b(digest_size=32)
    h.update(image.width.to_bytes(8, "little"))
    h.update(image.height.to_bytes(8, "little"))
    h.update(image.tobytes())
    return h.digest()


def load_image(url: str, *, where: str, max_edge: int | None = None, max_bytes: int = MAX_IMAGE_BYTES,
               timeout: float = FETCH_TIMEOUT_S) -> LoadedImage:
    """Decode the image an ``image_url`` part points at. ``where`` names the part in errors
    (``messages[0].content[1].image_url``)."""
    if not isinstance(url, str) or not url:
        raise ValueError(f"{where}: expected a non-empty string (data URI, URL, path or base64)")
    data = _read_bytes(url, where, max_bytes, timeout)
    image = _decode(data, where)
    if max_edge is not None and max(image.size) > max_edge:
        scale = max_edge / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.BICUBIC)
    return LoadedImage(image, pixel_digest(image))


def image_url_of(part: dict, where: str) -> str:
    """The url of an OpenAI ``image_url`` part (``{"url": ...}`` or a bare string)."""
    ref = part.get("image_url")
    if isinstance(ref, dict):
        ref = ref.get("url")
    if not isinstance(ref, str):
        raise ValueError(f"{where}: expected {{'url': str}} or a string, got {type(ref).__name__}")
    return ref


@attrs.frozen(eq=False)
class LoadedAudio:
    samples: np.ndarray           # float32 [n], mono (channels averaged), in [-1, 1]
    rate: int                     # samples per second of ``samples``
    content_hash: bytes           # blake2b-256 of (rate, samples): what the model hears

    @property
    def seconds(self) -> float:
        return len(self.samples) / self.rate


def load_audio(url: str, *, where: str, max_bytes: int = MAX_AUDIO_BYTES,
               timeout: float = FETCH_TIMEOUT_S) -> LoadedAudio:
    """Decode the clip an ``audio_url`` part points at (same sources as images) with
    soundfile: WAV, FLAC, OGG/Vorbis/Opus and MP3 where libsndfile has them."""
    if not isinstance(url, str) or not url:
        raise ValueError(f"{where}: expected a non-empty string (data URI, URL, path or base64)")
    return decode_audio(_read_bytes(url, where, max_bytes, timeout), where)


def audio_url_of(part: dict, where: str) -> str:
    """The source of an ``audio_url`` part (``{"url": ...}`` or a bare string) or of an
    OpenAI ``input_audio`` part (``{"data": base64, "format": "wav"}``)."""
    if part.get("type") == "input_audio":
        ref = part.get("input_audio")
        data = ref.get("data") if isinstance(ref, dict) else None
        if not isinstance(data, str) or not data:
            raise ValueError(f"{where}: expected {{'data': base64 str, 'format': str}}")
        return data
    ref = part.get("audio_url")
    if isinstance(ref, dict):
        ref = ref.get("url")
    if not isinstance(ref, str):
        raise ValueError(f"{where}: expected {{'url': str}} or a string, got {type(ref).__name__}")
    return ref


def decode_audio(data: bytes, where: str) -> LoadedAudio:
    import soundfile               # imported here: image-only deployments never load libsndfile
    try:
        samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as exc:       # libsndfile reports every malformed file as a RuntimeError-ish
        raise ValueError(f"{where}: not a decodable audio file ({type(exc).__name__}: {exc})") from None
    if samples.shape[0] == 0:
        raise ValueError(f"{where}: the audio clip holds no samples")
    mono = np.ascontiguousarray(samples.mean(axis=1, dtype=np.float32))
    if not np.isfinite(mono).all():
        raise ValueError(f"{where}: the audio clip holds NaN or infinite samples")
    h = hashlib.blake2b(digest_size=32)
    h.update(int(rate).to_bytes(8, "little"))
    h.update(mono.tobytes())
    return LoadedAudio(mono, int(rate), h.digest())


@attrs.frozen(eq=False)
class LoadedVideo:
    """The frames a model sees: already sampled (the processor's ``sample_video_frames``
    picked them from the decoded stream) or given as a list of images."""
    frames: np.ndarray            # uint8 [T, H, W, 3] RGB
    fps: float                    # frames per second of ``frames`` (after sampling)
    content_hash: bytes           # blake2b-256 of (T, H, W, fps, RGB bytes)


def video_digest(frames: np.ndarray, fps: float) -> bytes:
    # ``fps`` counts: Qwen2.5-VL spaces its temporal positions by it, so the same frames at
    # another rate are another prompt to the prefix cache.
    h = hashlib.blake2b(digest_size=32)
    for v in frames.shape[:3]:
        h.update(int(v).to_bytes(8, "little"))
    h.update(np.float64(fps).tobytes())
    h.update(np.ascontiguousarray(frames).tobytes())
    return h.digest()


def video_url_of(part: dict, where: str) -> tuple[str | list[str], float | None]:
    """The source of a ``video_url`` part and its optional ``fps``: ``{"url": str}`` (a video
    file, same sources as images), a bare string, or ``{"url": [frame urls], "fps": float}``
    (frames already sampled, e.g. by the client)."""
    ref, fps = part.get("video_url"), None
    if isinstance(ref, dict):
        ref, fps = ref.get("url"), ref.get("fps")
    if isinstance(ref, list):
        if not ref or not all(isinstance(u, str) for u in ref):
            raise ValueError(f"{where}: a frame list must be a non-empty list of image url strings")
    elif not isinstance(ref, str):
        raise ValueError(f"{where}: expected {{'url': str | list[str]}} or a string, got {type(ref).__name__}")
    if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < fps < 1e4):
        raise ValueError(f"{where}: fps must be a positive number, got {fps!r}")
    return ref, (float(fps) if fps is not None else None)


def load_video(url: str | list[str], *, where: str, sample_frames, fps: float,
               max_bytes: int = MAX_VIDEO_BYTES, timeout: float = FETCH_TIMEOUT_S) -> LoadedVideo:
    """Decode the video a ``video_url`` part points at. ``sample_frames(total_frames, rate) ->
    frame indices`` (the processor's rule) picks the frames of a video file; a frame list is
    taken whole, as frames ``fps`` apart (the part's ``fps`` or the rate the processor samples at)."""
    if isinstance(url, list):
        if len(url) > MAX_VIDEO_FRAMES:
            raise ValueError(f"{where}: {len(url)} frames exceed the {MAX_VIDEO_FRAMES}-frame limit")
        images = [load_image(u, where=f"{where}.url[{k}]").image for k, u in enumerate(url)]
        if len({im.size for im in images}) > 1:
            raise ValueError(f"{where}: the frames have different sizes {sorted({im.size for im in images})}")
        frames = np.stack([np.asarray(im) for im in images])
        return LoadedVideo(frames, float(fps), video_digest(frames, float(fps)))
    if not isinstance(url, str) or not url:
        raise ValueError(f"{where}: expected a non-empty string (data URI, URL, path or base64)")
    return decode_video(_read_bytes(url, where, max_bytes, timeout), where, sample_frames)


def decode_video(data: bytes, where: str, sample_frames) -> LoadedVideo:
    """PyAV: frame count and rate from the stream header (as transformers' PyAV reader reads
    them), then one decoding pass keeping only the sampled frames, so a long clip never
    sits in memory whole. A header without a frame count costs a counting pass first."""
    import av                      # imported here: image-only deployments never load FFmpeg

    def frames_of(container):
        return container.decode(container.streams.video[0])

    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise ValueError(f"{where}: the file holds no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            if not rate or rate <= 0:
                raise ValueError(f"{where}: the video stream has no frame rate")
            rate, total = float(rate), int(stream.frames or 0)
            if total <= 0:
                total = sum(1 for _ in frames_of(container))
        if total <= 0:
            raise ValueError(f"{where}: the video holds no frames")
        indices = [int(i) for i in sample_frames(total, rate)]
        if not indices or min(indices) < 0 or max(indices) >= total:
            raise ValueError(f"{where}: cannot sample frames {indices[:4]}... from {total} frames")
        if len(indices) > MAX_VIDEO_FRAMES:
            raise ValueError(f"{where}: {len(indices)} sampled frames exceed the {MAX_VIDEO_FRAMES}-frame limit")
        wanted, picked, last = set(indices), {}, max(indices)
        with av.open(io.BytesIO(data), mode="r") as container:
            for k, frame in enumerate(frames_of(container)):
                if k in wanted:
                    picked[k] = frame.to_ndarray(format="rgb24")
                if k >= last:
                    break
    except av.FFmpegError as exc:  # some of PyAV's errors are ValueErrors without the part's name
        raise ValueError(f"{where}: not a decodable video file ({type(exc).__name__}: {exc})") from None
    except ValueError:
        raise
    except Exception as exc:
        raise ValueError(f"{where}: not a decodable video file ({type(exc).__name__}: {exc})") from None
    if len(picked) < len(wanted):
        raise ValueError(f"{where}: the video decodes to fewer frames than its header's {total}")
    frames = np.stack([picked[i] for i in indices])
    sampled_fps = len(indices) / total * rate
    return LoadedVideo(frames, sampled_fps, video_digest(frames, sampled_fps))


# --------------------------------------------------------------------------- sources
def _read_bytes(url: str, where: str, max_bytes: int, timeout: float) -> bytes:
    lower = url[:16].lower()
    if lower.startswith("data:"):
        return _from_data_uri(url, where, max_bytes)
    if lower.startswith(("http://", "https://")):
        return _fetch(url, where, max_bytes, timeout)
    if lower.startswith("file://"):
        parsed = urllib.parse.urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"{where}: file:// URL with a remote host {parsed.netloc!r}")
        return _from_file(urllib.request.url2pathname(parsed.path), where, max_bytes)
    scheme = urllib.parse.urlparse(url).scheme
    if scheme and len(scheme) > 1 and "://" in url[:len(scheme) + 3]:
        raise ValueError(f"{where}: unsupported URL scheme {scheme!r} (use data:, http(s):, file: or a path)")
    if len(url) < 4096 and os.path.isfile(url):
        return _from_file(url, where, max_bytes)
    return _from_base64(url, where, max_bytes)


def _check_size(n: int, where: str, max_bytes: int) -> None:
    if n > max_bytes:
        raise ValueError(f"{where}: the payload is larger than the {max_bytes}-byte limit")


def _from_base64(text: str, where: str, max_bytes: int) -> bytes:
    # Encoded length bounds the decoded one: refuse before decoding a huge payload.
    _check_size(len(text) * 3 // 4, where, max_bytes)
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{where}: not a data URI, http(s)/file URL, existing file path or valid base64 "
                         f"data") from None


def _from_data_uri(url: str, where: str, max_bytes: int) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep:
        raise ValueError(f"{where}: data URI without a ',' separating header and payload")
    if header.lower().endswith(";base64"):
        return _from_base64(payload, where, max_bytes)
    data = urllib.parse.unquote_to_bytes(payload)
    _check_size(len(data), where, max_bytes)
    return data


def _from_file(path: str, where: str, max_bytes: int) -> bytes:
    try:
        size = os.path.getsize(path)
        _check_size(size, where, max_bytes)
        with open(path, "rb") as f:
            return f.read(max_bytes + 1)
    except OSError as exc:
        raise ValueError(f"{where}: cannot read file {path!r}: {exc.strerror or exc}") from None


def _http_opener() -> urllib.request.OpenerDirector:
    # http(s) only: the default opener would also follow a redirect to ftp://.
    opener = urllib.request.OpenerDirector()
    for handler in (urllib.request.HTTPHandler, urllib.request.HTTPSHandler, urllib.request.HTTPRedirectHandler,
                    urllib.request.HTTPDefaultErrorHandler, urllib.request.HTTPErrorProcessor):
        opener.add_handler(handler())
    return opener


def _fetch(url: str, where: str, max_bytes: int, timeout: float) -> bytes:
    req = urllib.request.Request(url, headers={"User-Agent": "mistralrs-arch-vision"})
    # ``timeout`` bounds each socket operation; the deadline bounds the whole transfer, so
    # a server dripping bytes cannot hold a request thread indefinitely.
    deadline = time.monotonic() + timeout
    try:
        with _http_opener().open(req, timeout=timeout) as resp:
            length = resp.headers.get("Content-Length")
            if length is not None and length.isdigit():
                _check_size(int(length), where, max_bytes)
            chunks, size = [], 0
            while True:
                # Never more than one byte past the limit, whatever the server says its length is.
                chunk = resp.read(min(1 << 16, max_bytes + 1 - size))
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
                _check_size(size, where, max_bytes)
                if time.monotonic() > deadline:
                    raise ValueError(f"{where}: fetching {url!r} took longer than {timeout:g} s")
    except urllib.error.HTTPError as exc:
        raise ValueError(f"{where}: fetching {url!r} failed with HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ValueError(f"{where}: cannot fetch {url!r}: {reason}") from None
    return b"".join(chunks)


# --------------------------------------------------------------------------- decoding
def _decode(data: bytes, where: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # A decompression-bomb *warning* becomes an error: a tiny file must not
            # expand into gigabytes of pixels.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()                    # decode now: truncated files fail here, not later
            image = ImageOps.exif_transpose(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ValueError(f"{where}: image has too many pixels") from None
    except Exception as exc:            # Pillow raises many types for corrupt data
        raise ValueError(f"{where}: not a decodable image ({type(exc).__name__}: {exc})") from None
    return to_rgb(image)


def to_rgb(image) -> Image.Image:
    """An RGB Pillow image; transparency is composited onto white (as the reference does,
    so a transparent background is not read as black)."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"images must be PIL images or HWC uint8 arrays, got {type(image).__name__}")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")
