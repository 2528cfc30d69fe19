"""Model resolution, token sources, safetensors and HF config reading (all offline)."""

from __future__ import annotations

import json
import socket

import pytest
import torch
from safetensors.torch import save_file

from mistralrs_core.loading import (
    SafetensorsWeights,
    config_eos_token_ids,
    load_generation_config,
    load_json,
    load_model_config,
    max_context_length,
    parse_token_source,
    resolve_file,
    resolve_model_dir,
)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test loudly."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def offline(monkeypatch, tmp_path, no_network):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    return tmp_path / "hf_cache"


# ---------------------------------------------------------------------- token_source


def test_token_source_forms(monkeypatch, tmp_path):
    assert parse_token_source("cache") is None
    assert parse_token_source("none") is False
    assert parse_token_source("literal:hf_abc:def") == "hf_abc:def"
    monkeypatch.setenv("MY_TOK", " hf_env \n")
    assert parse_token_source("env:MY_TOK") == "hf_env"
    f = tmp_path / "tok.txt"
    f.write_text("hf_file\n")
    assert parse_token_source(f"path:{f}") == "hf_file"


@pytest.mark.parametrize(
    "bad, match",
    [
        ("bogus", "token_source"),
        ("literal:", "token"),
        ("env:DEFINITELY_NOT_SET_123", "DEFINITELY_NOT_SET_123"),
        ("path:/no/such/token/file", "/no/such/token/file"),
        ("file:/x", "token_source"),
    ],
)
def test_token_source_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        parse_token_source(bad)


# ------------------------------------------------------------------------ resolving


def test_resolve_local_dir(tmp_path, no_network):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model_dir(str(tmp_path)) == tmp_path.resolve()
    assert resolve_file(str(tmp_path), "config.json") == (tmp_path / "config.json").resolve()
    with pytest.raises(FileNotFoundError, match="weights.gguf"):
        resolve_file(str(tmp_path), "weights.gguf")
    assert resolve_file("", str(tmp_path / "config.json")) == (tmp_path / "config.json").resolve()


def test_resolve_missing_local_path(tmp_path, no_network):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_dir(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_dir("./relative/missing")
    f = tmp_path / "file.bin"
    f.write_bytes(b"x")
    with pytest.raises(NotADirectoryError):
        resolve_model_dir(str(f))


def test_resolve_bad_token_source_before_anything(tmp_path):
    with pytest.raises(ValueError, match="token_source"):
        resolve_model_dir(str(tmp_path), token_source="nonsense")


def test_resolve_hub_id_offline_not_cached(offline):
    with pytest.raises(FileNotFoundError) as info:
        resolve_model_dir("some-org/definitely-not-cached-model", hf_cache_path=str(offline))
    msg = str(info.value)
    assert "some-org/definitely-not-cached-model" in msg and "HF_HUB_OFFLINE" in msg
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        resolve_file("some-org/definitely-not-cached-model", "model.gguf", hf_cache_path=str(offline))


def test_resolve_hub_id_offline_cached(offline):
    """A snapshot already in the cache is found without the network."""
    repo = offline / "models--org--tiny"
    commit = "a" * 40
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    got = resolve_model_dir("org/tiny", hf_cache_path=str(offline))
    assert (got / "config.json").is_file()


# ---------------------------------------------------------------------- safetensors


def test_single_file(tmp_path):
    a, b = torch.randn(3, 4), torch.arange(6, dtype=torch.int32)
    save_file({"a": a, "b": b}, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    w = SafetensorsWeights(tmp_path)
    assert sorted(w.names()) == ["a", "b"] and "a" in w and "c" not in w and len(w) == 2
    assert torch.equal(w.get("a"), a) and torch.equal(w.get("b"), b)
    assert w.shape("a") == (3, 4) and w.dtype_name("b") == "I32"
    assert w.metadata() == {"format": "pt"}
    with pytest.raises(KeyError, match="nope"):
        w.get("nope")
    it = w.items()
    name, tensor = next(it)  # lazily yields one at a time
    assert name in ("a", "b") and isinstance(tensor, torch.Tensor)
    assert dict(w.items()).keys() == {"a", "b"}
    with SafetensorsWeights(tmp_path / "model.safetensors") as direct:
        assert torch.equal(direct.get("a"), a)


def test_sharded_with_index(tmp_path):
    tensors = {f"layer.{i}.weight": torch.full((2, 2), float(i)) for i in range(4)}
    shard1 = {k: v for k, v in tensors.items() if int(k.split(".")[1]) < 2}
    shard2 = {k: v for k, v in tensors.items() if k not in shard1}
    save_file(shard1, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file(shard2, str(tmp_path / "model-00002-of-00002.safetensors"))
    # a stray duplicate must be ignored because the index decides
    save_file(shard1, str(tmp_path / "consolidated.safetensors"))
    weight_map = {k: "model-00001-of-00002.safetensors" for k in shard1}
    weight_map |= {k: "model-00002-of-00002.safetensors" for k in shard2}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    w = SafetensorsWeights(tmp_path)
    assert set(w.names()) == set(tensors)
    for k, v in tensors.items():
        assert torch.equal(w.get(k), v)
    assert w.file_of("layer.3.weight").name == "model-00002-of-00002.safetensors"
    assert len(w.files) == 2


def test_index_missing_shard(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "gone.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="gone.safetensors"):
        SafetensorsWeights(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text("{oops")
    with pytest.raises(ValueError, match="index.json"):
        SafetensorsWeights(tmp_path)


def test_index_names_tensor_absent_from_shard(tmp_path):
    save_file({"x": torch.zeros(1)}, str(tmp_path / "s.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "s.safetensors", "y": "s.safetensors"}})
    )
    w = SafetensorsWeights(tmp_path)
    with pytest.raises(KeyError, match="'y'"):
        w.get("y")


def test_glob_files_and_duplicates(tmp_path):
    save_file({"a": torch.zeros(1)}, str(tmp_path / "part1.safetensors"))
    save_file({"b": torch.ones(1)}, str(tmp_path / "part2.safetensors"))
    w = SafetensorsWeights(tmp_path)
    assert set(w.names()) == {"a", "b"}
    save_file({"a": torch.ones(1)}, str(tmp_path / "part3.safetensors"))
    with pytest.raises(ValueError, match="appears in both"):
        SafetensorsWeights(tmp_path)
    w = SafetensorsWeights([tmp_path / "part1.safetensors", tmp_path / "part2.safetensors"])
    assert set(w.names()) == {"a", "b"}


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.pth"])
def test_pickle_checkpoints_refused(tmp_path, name):
    (tmp_path / name).write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ValueError, match="pickle") as info:
        SafetensorsWeights(tmp_path)
    assert name in str(info.value) and "safetensors" in str(info.value)
    with pytest.raises(ValueError, match="pickle"):
        SafetensorsWeights(tmp_path / name)


def test_no_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="safetensors"):
        SafetensorsWeights(tmp_path)
    with pytest.raises(FileNotFoundError):
        SafetensorsWeights(tmp_path / "missing_dir")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_file_message(tmp_path, damage):
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.randn(64, 64)}, str(path))
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"garbage!" * 4, "empty": b""}[damage])
    with pytest.raises(ValueError) as info:
        SafetensorsWeights(tmp_path)
    msg = str(info.value)
    assert "model.safetensors" in msg and "corrupt or truncated" in msg
    assert "\n" not in msg


# ------------------------------------------------------------------------ HF config


def test_model_config(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_model_config(tmp_path)
    (tmp_path / "config.json").write_text('{"max_position_embeddings": 2048,')
    with pytest.raises(ValueError, match="config.json"):
        load_model_config(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        load_model_config(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama", "max_position_embeddings": 2048}')
    assert load_model_config(tmp_path)["model_type"] == "llama"


def test_generation_config(tmp_path):
    assert load_generation_config(tmp_path) == {}
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [1, 2], "temperature": 0.6}')
    gen = load_generation_config(tmp_path)
    assert gen["temperature"] == 0.6
    assert config_eos_token_ids(gen, {"eos_token_id": 7, "text_config": {"eos_token_id": 9}}, None) == {1, 2, 7, 9}
    (tmp_path / "generation_config.json").write_bytes(b"\xff\xfe bad")
    with pytest.raises(ValueError, match="generation_config.json"):
        load_generation_config(tmp_path)


def test_load_json_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="x.json"):
        load_json(tmp_path / "x.json")


@pytest.mark.parametrize(
    "config, expected",
    [
        ({"max_position_embeddings": 8192}, 8192),
        ({"n_positions": 1024}, 1024),
        ({"seq_length": 32768}, 32768),
        ({"text_config": {"max_position_embeddings": 131072}}, 131072),
        ({"max_position_embeddings": None, "n_positions": 512}, 512),
        ({}, 4096),
        ({"max_position_embeddings": True}, 4096),
    ],
)
def test_max_context_length(config, expected):
    assert max_context_length(config) == expected
