"""Memory-mapped access to a model's safetensors weights (single file or sharded).

Only safetensors are read: pickle checkpoints (`.bin`, `.pt`, `.pth`) can run arbitrary
code when loaded, and model files come from untrusted places.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _unsafe_checkpoints(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.is_file() and p.suffix in _PICKLE_SUFFIXES)


def _corrupt(path: Path, exc: Exception) -> ValueError:
    return ValueError(
        f"safetensors file {str(path)!r} is corrupt or truncated and cannot be read ({exc}); "
        "download it again"
    )


def find_safetensors_files(model_dir: str | os.PathLike) -> tuple[list[Path], dict[str, str] | None]:
    """The weight files of a model directory and, when sharded with an index, its weight map.

    Preference: the index's shards, then `model.safetensors`, then every `*.safetensors`.
    """
    directory = Path(model_dir)
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory {str(directory)!r} does not exist")
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{str(index)!r} is not valid JSON: {exc}") from None
        except (KeyError, TypeError):
            raise ValueError(f"{str(index)!r} has no 'weight_map' object") from None
        if not isinstance(weight_map, dict):
            raise ValueError(f"{str(index)!r}: 'weight_map' must map tensor names to shard file names")
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (directory / s).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{INDEX_FILE} in {str(directory)!r} lists shard(s) that are missing: {', '.join(missing)}"
            )
        return [directory / s for s in shards], dict(weight_map)
    single = directory / SINGLE_FILE
    if single.is_file():
        return [single], None
    files = sorted(directory.glob("*.safetensors"))
    if files:
        return files, None
    unsafe = _unsafe_checkpoints(directory)
    if unsafe:
        raise ValueError(
            f"{str(directory)!r} holds only pickle checkpoints ({', '.join(unsafe)}); these are refused "
            "for safety because loading them can run arbitrary code. Convert them to safetensors "
            "(e.g. with safetensors.torch.save_file) or use a repo that ships *.safetensors"
        )
    raise FileNotFoundError(f"no *.safetensors weight files found in {str(directory)!r}")


class SafetensorsWeights:
    """Name → tensor view over one or more safetensors files, opened lazily and mmapped.

    `path` may be a model directory, one `.safetensors` file, or a list of files.
    """

    def __init__(self, path: str | os.PathLike | Sequence[str | os.PathLike]):
        self._handles: dict[Path, object] = {}
        weight_map: dict[str, str] | None = None
        if isinstance(path, (str, os.PathLike)):
            p = Path(path)
            if p.is_file():
                files = [self._check_file(p)]
                base = p.parent
            else:
                files, weight_map = find_safetensors_files(p)
                base = p
        else:
            files = [self._check_file(Path(f)) for f in path]
            base = None
        self.files: list[Path] = files
        self._where: dict[str, Path] = {}
        if weight_map is not None:
            assert base is not None
            self._where = {name: base / shard for name, shard in weight_map.items()}
        else:
            for f in files:
                for name in self._handle(f).keys():
                    if name in self._where:
                        raise ValueError(
                            f"tensor {name!r} appears in both {self._where[name].name} and {f.name}; "
                            "remove the duplicate weight file or add a model.safetensors.index.json"
                        )
                    self._where[name] = f

    @staticmethod
    def _check_file(p: Path) -> Path:
        if not p.is_file():
            raise FileNotFoundError(f"safetensors file {str(p)!r} does not exist")
        if p.suffix in _PICKLE_SUFFIXES:
            raise ValueError(f"{str(p)!r} is a pickle checkpoint; refused for safety, convert it to safetensors")
        return p

    def _handle(self, f: Path):
        h = self._handles.get(f)
        if h is None:
            from safetensors import SafetensorError, safe_open

            try:
                h = safe_open(str(f), framework="pt")
            except SafetensorError as exc:
                raise _corrupt(f, exc) from None
            except OSError as exc:
                raise ValueError(f"cannot open safetensors file {str(f)!r}: {exc.strerror or exc}") from None
            self._handles[f] = h
        return h

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def __len__(self) -> int:
        return len(self._where)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def file_of(self, name: str) -> Path:
        try:
            return self._where[name]
        except KeyError:
            raise KeyError(f"tensor {name!r} not found in the model weights") from None

    def get(self, name: str) -> torch.Tensor:
        f = self.file_of(name)
        from safetensors import SafetensorError

        try:
            return self._handle(f).get_tensor(name)
        except SafetensorError as exc:
            # A name listed by the index but absent from its shard, or bytes cut off mid-tensor.
            if name not in self._handle(f).keys():
                raise KeyError(f"tensor {name!r} is listed in the index but missing from {f.name}") from None
            raise _corrupt(f, exc) from None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(self.file_of(name)).get_slice(name).get_shape())

    def dtype_name(self, name: str) -> str:
        """The stored dtype as safetensors spells it ("BF16", "F32", ...), without loading data."""
        return self._handle(self.file_of(name)).get_slice(name).get_dtype()

    def metadata(self) -> dict[str, str]:
        """The `__metadata__` header of the first file (e.g. {"format": "pt"})."""
        return dict(self._handle(self.files[0]).metadata() or {})

    def items(self, names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) one at a time, so only one tensor is materialised at once."""
        for name in (self._where if names is None else names):
            yield name, self.get(name)

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> "SafetensorsWeights":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SafetensorsWeights({len(self._where)} tensors in {len(self.files)} file(s))"
