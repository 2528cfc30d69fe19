"""Hostile model files: mutated GGUF and safetensors headers load in a child process under
an address-space bound; every load ends cleanly (loaded, or a ValueError/OSError naming the
file), never in a signal, a hang or an allocation beyond the bound."""
from __future__ import annotations

import collections
import random
import shutil

import pytest

from conftest import LONG, record, size
from fuzz_files import FAILURES, Fuzzer, gguf_fields, mutate_gguf, mutate_safetensors, write_sparse_mutant


def _summary(fuzzer: Fuzzer) -> dict:
    return dict(collections.Counter(r["outcome"] for r in fuzzer.results))


def _failures(fuzzer: Fuzzer) -> list[str]:
    return [f"{r['file']} {r['outcome']} {r['mutations']}: {r['msg']}" for r in fuzzer.results
            if r["outcome"] in FAILURES]


def _gguf_files(smollm2_file) -> list:
    files = [smollm2_file]
    if LONG:
        from mistralrs_quant.real_models import gemma3_gguf
        gemma = gemma3_gguf()
        if gemma is not None:
            files.append(gemma)
    return files


def test_the_address_space_bound_holds(tmp_path):
    fuzzer = Fuzzer(tmp_path, slack=1 << 30)
    try:
        assert fuzzer.run(0, "alloc", tmp_path / str(2 << 30), False, [], name="-")["outcome"] == "memory"
        assert fuzzer.run(1, "alloc", tmp_path / str(64 << 20), False, [], name="-")["outcome"] == "ok"
    finally:
        fuzzer.close()


def test_gguf_header_mutants_end_cleanly(smollm2_file, tmp_path):
    rng = random.Random(21)
    n, full_budget = size(120, 1400), size(4, 150)
    fuzzer = Fuzzer(tmp_path)
    try:
        sources = []
        for path in _gguf_files(smollm2_file):
            with open(path, "rb") as f:
                head = f.read(16 << 20)
            fields, header_end = gguf_fields(head)
            sources.append((path, head[:header_end], fields, path.stat().st_size))
        for i in range(n):
            # Gemma 3 (long form only) takes every fourth mutant, header loads only: its full
            # load would take most of the time budget.
            gemma = len(sources) > 1 and i % 4 == 3
            path, header, fields, file_size = sources[1 if gemma else 0]
            data = bytearray(header)
            what = mutate_gguf(data, fields, len(header), rng)
            mutant = tmp_path / f"mutant-{i:04d}.gguf"
            write_sparse_mutant(mutant, bytes(data), file_size)
            res = fuzzer.run(i, "gguf", mutant, False, what)
            if res["outcome"] == "ok" and full_budget > 0 and not gemma:
                full_budget -= 1
                fuzzer.run(i, "gguf", mutant, True, what)
            mutant.unlink()
    finally:
        fuzzer.close()
    failures = _failures(fuzzer)
    record("fuzz_gguf", mutants=n, loads=len(fuzzer.results), outcomes=_summary(fuzzer),
           failures=len(failures))
    assert not failures, "\n".join(failures[:30])


@pytest.fixture(scope="module")
def random_llama(tmp_path_factory):
    from mistralrs_core.testing.tiny import write_random_llama
    return write_random_llama(tmp_path_factory.mktemp("st") / "tiny")


def test_safetensors_header_mutants_end_cleanly(random_llama, tmp_path):
    rng = random.Random(7)
    n = size(60, 600)
    original = bytearray((random_llama / "model.safetensors").read_bytes())
    fuzzer = Fuzzer(tmp_path)
    try:
        for i in range(n):
            data, what = mutate_safetensors(bytearray(original), rng)
            d = tmp_path / f"mutant-{i:04d}"
            d.mkdir()
            for f in random_llama.iterdir():
                if f.name != "model.safetensors":
                    (d / f.name).symlink_to(f)
            (d / "model.safetensors").write_bytes(bytes(data))
            fuzzer.run(i, "safetensors", d / "model.safetensors", True, what, name=d.name)
            shutil.rmtree(d)
    finally:
        fuzzer.close()
    failures = _failures(fuzzer)
    record("fuzz_safetensors", mutants=n, outcomes=_summary(fuzzer), failures=len(failures))
    assert not failures, "\n".join(failures[:30])
