"""Every ``image_url`` source gives the same pixels and hash; every bad input is a
ValueError naming the part."""
import base64
import http.server
import io
import socket
import threading

import numpy as np
import pytest
from PIL import Image

from mistralrs_arch_vision.inputs import LoadedImage, load_image, pixel_digest

WHERE = "messages[0].content[1].image_url"


def png_bytes(w=12, h=7, seed=0, mode="RGB") -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: dict = {}

    def do_GET(self):
        if self.path == "/to-ftp":
            self.send_response(302)
            self.send_header("Location", "ftp://127.0.0.1/x.png")
            self.end_headers()
            return
        if self.path == "/no-length":          # a body with no Content-Length (read to EOF)
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(png_bytes())
            return
        body = self.routes.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def http_url():
    """A local server on 127.0.0.1 that stops itself after the module (and times out idle
    connections)."""
    _Handler.routes = {"/img.png": png_bytes(), "/not-an-image": b"hello, world"}
    _Handler.timeout = 5
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_every_source_gives_the_same_pixels_and_hash(tmp_path, http_url):
    data = png_bytes()
    path = tmp_path / "img.png"
    path.write_bytes(data)
    b64 = base64.b64encode(data).decode()
    sources = ["data:image/png;base64," + b64, b64, str(path), path.as_uri(), http_url + "/img.png",
               # whitespace inside base64 (line-wrapped payloads) is allowed
               "\n".join(b64[i:i + 60] for i in range(0, len(b64), 60))]
    loaded = [load_image(s, where=WHERE) for s in sources]
    assert all(isinstance(x, LoadedImage) and x.image.mode == "RGB" for x in loaded)
    assert len({x.content_hash for x in loaded}) == 1
    assert len({x.image.tobytes() for x in loaded}) == 1
    # The same pixels in another encoding share the hash; other pixels do not.
    jpeg_free = Image.open(io.BytesIO(data))
    buf = io.BytesIO()
    jpeg_free.save(buf, format="BMP")
    assert load_image(base64.b64encode(buf.getvalue()).decode(), where=WHERE).content_hash == loaded[0].content_hash
    other = load_image(base64.b64encode(png_bytes(seed=1)).decode(), where=WHERE)
    assert other.content_hash != loaded[0].content_hash


def test_modes_exif_and_max_edge():
    rgba = load_image(base64.b64encode(png_bytes(mode="RGBA")).decode(), where=WHERE)
    assert rgba.image.mode == "RGB"
    # EXIF orientation 6 (rotate 90° clockwise to display): a 12x7 JPEG shows as 7x12.
    img = Image.fromarray(np.zeros((7, 12, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes())
    assert load_image(base64.b64encode(buf.getvalue()).decode(), where=WHERE).image.size == (7, 12)
    capped = load_image(base64.b64encode(png_bytes(w=40, h=10)).decode(), where=WHERE, max_edge=20)
    assert capped.image.size == (20, 5)
    assert capped.content_hash == pixel_digest(capped.image)


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.mark.parametrize("make, why", [
    (lambda d, u: "data:image/png;base64,%%%notbase64", "base64"),
    (lambda d, u: "data:image/png;base64", "separating"),
    (lambda d, u: base64.b64encode(b"just some text, not an image").decode(), "not a decodable image"),
    (lambda d, u: base64.b64encode(png_bytes()[:40]).decode(), "not a decodable image"),
    (lambda d, u: "not base64 and not a path!", "base64"),
    (lambda d, u: str(d / "missing.png"), "base64"),           # no such file: not base64 either
    (lambda d, u: (d / "missing.png").as_uri(), "cannot read file"),
    (lambda d, u: u + "/nope.png", "HTTP 404"),
    (lambda d, u: u + "/not-an-image", "not a decodable image"),
    (lambda d, u: f"http://127.0.0.1:{_closed_port()}/x.png", "cannot fetch"),
    (lambda d, u: "ftp://example.com/x.png", "unsupported URL scheme"),
    (lambda d, u: u + "/to-ftp", "HTTP 302"),            # redirects stay on http(s)
    (lambda d, u: "", "non-empty"),
])
def test_bad_inputs_are_value_errors_naming_the_part(tmp_path, http_url, make, why):
    with pytest.raises(ValueError) as info:
        load_image(make(tmp_path, http_url), where=WHERE)
    assert str(info.value).startswith(WHERE + ": ")
    assert why in str(info.value)


def test_size_limits(tmp_path, http_url, monkeypatch):
    data = png_bytes()
    path = tmp_path / "img.png"
    path.write_bytes(data)
    for src in ["data:image/png;base64," + base64.b64encode(data).decode(), str(path),
                http_url + "/img.png", http_url + "/no-length"]:
        with pytest.raises(ValueError, match=r"^messages\[0\]\.content\[1\]\.image_url: .*limit"):
            load_image(src, where=WHERE, max_bytes=len(data) - 1)
        assert load_image(src, where=WHERE, max_bytes=len(data)).image.size == (12, 7)
    # Pixel count, not file size: a small PNG that decodes to a huge canvas (Pillow's bomb
    # limit, lowered here so the test need not encode a gigapixel image).
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    for side in (40, 100):                  # over the limit (Pillow warns), over twice it (raises)
        buf = io.BytesIO()
        Image.new("RGB", (side, side)).save(buf, format="PNG")
        with pytest.raises(ValueError, match="too many pixels"):
            load_image(base64.b64encode(buf.getvalue()).decode(), where=WHERE)


def test_transparency_is_composited_onto_white_as_transformers_does():
    img = Image.new("RGBA", (4, 3), (10, 20, 30, 255))
    img.putpixel((0, 0), (200, 0, 0, 0))          # fully transparent
    img.putpixel((1, 0), (0, 0, 0, 128))          # half transparent black
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    got = load_image(base64.b64encode(buf.getvalue()).decode(), where=WHERE).image
    assert got.mode == "RGB"
    assert got.getpixel((0, 0)) == (255, 255, 255)
    assert got.getpixel((1, 0)) == (127, 127, 127)
    assert got.getpixel((2, 0)) == (10, 20, 30)
