"""``POST /v1/images/generations`` through the real ``mistralrs serve`` with the official
openai client: b64_json and url answers, bad sizes answered 400 while the server keeps
serving."""
from __future__ import annotations

import base64
import io
import os

import numpy as np
import openai
import pytest
from PIL import Image

from mistralrs_core.testing.server import Server


@pytest.fixture(scope="module")
def server(tiny_flux_models, tmp_path_factory):
    folder = tiny_flux_models["schnell"][1]
    log = tmp_path_factory.mktemp("srv") / "server.log"
    s = Server(["-m", str(folder), "--kind", "diffusion", "--arch", "Flux", "--dtype", "f32", "--seed", "3"],
               log).wait()
    yield s
    s.stop()


def test_images_generate_through_the_openai_client(server, tmp_path):
    client = server.client()
    res = client.images.generate(model="default", prompt="a red fox in the snow", size="64x48",
                                 response_format="b64_json")
    assert len(res.data) == 1 and res.created > 0
    img = Image.open(io.BytesIO(base64.b64decode(res.data[0].b64_json)))
    assert img.size == (64, 48) and img.format == "PNG"
    url = client.images.generate(model="default", prompt="a cat", size="32x32", response_format="url")
    path = url.data[0].url
    try:
        assert path.endswith(".png") and Image.open(path).size == (32, 32)
    finally:
        # Written to the server's working directory, as upstream does.
        os.unlink(path)
    with pytest.raises(openai.BadRequestError, match="height: must be a multiple of 16"):
        client.images.generate(model="default", prompt="a cat", size="32x40")
    with pytest.raises(openai.BadRequestError, match="prompt"):
        client.images.generate(model="default", prompt="", size="32x32")
    again = client.images.generate(model="default", prompt="a cat", size="32x32", response_format="b64_json")
    arr = np.asarray(Image.open(io.BytesIO(base64.b64decode(again.data[0].b64_json))))
    assert arr.shape == (32, 32, 3)
