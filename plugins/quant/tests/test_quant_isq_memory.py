"""Peak memory of in-situ quantization: the quantized model, one checkpoint tensor, and
little else. Measured in a fresh process (peak RSS is per process and only grows)."""
import json
import subprocess
import sys
import textwrap

import pytest

from mistralrs_core.testing.tiny import write_random_llama
from mistralrs_quant.kernels import cpp as cpp_kernels

MiB = 2 ** 20
# What the bound allows beyond the quantized model and the largest tensor: the quantizer's
# output for one slab, the loader's bookkeeping, allocator rounding. Measured: 25.5 MiB
# above the floor against a bound of 37.3; 95 MiB without the page release.
SLACK = 8 * MiB

_CHILD = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch
    torch.set_num_threads(1)   # one OpenMP thread: no per-thread arenas in the measure
    from mistralrs_quant.isq.loader import load_isq_model
    from mistralrs_quant.isq.plan import build_plan

    class Which:
        topology = organization = imatrix = calibration_file = arch = None

    class Opts:
        in_situ_quant, quant_kernel = "Q4K", None

    def status():
        out = {}
        for line in open("/proc/self/status"):
            key, _, val = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(val.split()[0]) * 1024
        return out

    def load(path):
        cpu = torch.device("cpu")
        return load_isq_model(Path(path), Which, Opts, cpu, torch.float32, torch.float32)[0]

    # A first, tiny load imports every module and starts the kernels, so the floor below
    # holds all the code and only the second load's data is measured.
    load(sys.argv[1])
    floor = status()
    # Start the high-water mark from here ("5" resets VmHWM to the current RSS).
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    model = load(sys.argv[2])
    peak, after = status()["VmHWM"], status()
    quantized = dense = 0
    seen = set()
    for m in model.modules():
        q = getattr(m, "qmethod", None)
        for t in (vars(q).values() if q is not None else ()):
            if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                quantized += t.numel() * t.element_size()
    for t in model.parameters():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            dense += t.numel() * t.element_size()
    mapped = any(line.rstrip().endswith(str(Path(sys.argv[2]) / "model.safetensors"))
                 for line in open("/proc/self/maps"))
    print(json.dumps({"floor": floor, "peak": peak, "after": after, "quantized": quantized, "dense": dense,
                      "mapped": mapped}))
""")


@pytest.mark.skipif(not cpp_kernels.available(), reason="C++ kernels unavailable")
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_isq_peak_rss_is_quantized_model_plus_one_tensor(tmp_path):
    warm = write_random_llama(tmp_path / "warm", hidden=256, intermediate=512, heads=4, kv_heads=2, layers=1,
                              vocab=512)
    # 80 MiB of float32: 4 layers of 12 MiB, a 16 MiB embedding and an untied 16 MiB head.
    big = write_random_llama(tmp_path / "big", hidden=512, intermediate=1536, heads=8, kv_heads=4, layers=4,
                             vocab=8192)
    checkpoint = (big / "model.safetensors").stat().st_size
    largest = 8192 * 512 * 4
    try:
        open("/proc/self/clear_refs", "w").close()
    except OSError:
        pytest.skip("/proc/self/clear_refs is not writable here (the peak cannot be reset)")
    r = subprocess.run([sys.executable, "-c", _CHILD, str(warm), str(big)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    grew = m["peak"] - m["floor"]["VmRSS"]
    bound = m["quantized"] + m["dense"] + largest + SLACK
    detail = (f"peak {grew / MiB:.1f} MiB above the floor, bound {bound / MiB:.1f} (quantized "
              f"{m['quantized'] / MiB:.1f}, largest tensor {largest / MiB:.0f}, slack {SLACK / MiB:.0f}); "
              f"checkpoint {checkpoint / MiB:.0f} MiB; file pages after {m['after']['RssFile'] / MiB:.1f} "
              f"(floor {m['floor']['RssFile'] / MiB:.1f})")
    assert checkpoint > 75 * MiB and m["quantized"] < 16 * MiB
    assert grew <= bound, detail
    # Nothing of the float checkpoint stays once loaded: not its mapping (the dense norms
    # have their own memory), its file pages or an anonymous float32 copy.
    assert not m["mapped"], "the checkpoint is still mapped after the load"
    assert m["after"]["RssFile"] - m["floor"]["RssFile"] <= 4 * MiB, detail
    assert m["after"]["RssAnon"] - m["floor"]["RssAnon"] <= m["quantized"] + m["dense"] + SLACK, detail
