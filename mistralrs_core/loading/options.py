"""Runner arguments that shape how a model is loaded and served."""
from __future__ import annotations

import attrs
import torch


@attrs.define
class LoadOptions:
    max_seqs: int = 16
    no_kv_cache: bool = False
    prefix_cache_n: int = 16
    token_source: str = "cache"
    chat_template: str | None = None
    jinja_explicit: str | None = None
    in_situ_quant: str | None = None
    pa_gpu_mem: int | None = None
    pa_gpu_mem_usage: float | None = None
    pa_ctxt_len: int | None = None
    pa_blk_size: int | None = None
    pa_cache_type: object = None
    no_paged_attn: bool = False
    paged_attn: bool = False
    seed: int | None = None
    device: str | None = None
    max_batch_tokens: int | None = None
    # CPU kernel variant for quantized (GGUF/GGML) weights; None/"auto": the exact one.
    # A load option, not an environment switch: it changes the numbers.
    quant_kernel: str | None = None
    # Admission control and a time limit per request (see engine.EngineConfig).
    max_queue: int | None = None
    request_timeout: float | None = None
    # Device mapping: "ORD:NUM" entries (mistralrs_core/distributed/device_map.py).
    num_device_layers: list[str] | None = None
    # Progress bars and notices while loading (mistralrs_core.progress); None: the
    # MISTRALRS_PROGRESS environment variable, else only on a terminal.
    progress: bool | None = None


def pick_device(requested: str | None) -> torch.device:
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(model_dtype, device: torch.device) -> torch.dtype:
    """``ModelDType.Auto``: bf16 where the hardware has fast bf16 matmuls (CUDA with
    compute capability >= 8, CPUs with AMX/AVX512-BF16), float32 otherwise. On the CPUs we
    measured, bf16 halves the bytes read per token and runs the matmuls on AMX tiles."""
    name = getattr(model_dtype, "name", str(model_dtype or "Auto")).upper()
    if name in ("BF16", "BFLOAT16"):
        return torch.bfloat16
    if name in ("F16", "FLOAT16"):
        return torch.float16
    if name in ("F32", "FLOAT32"):
        return torch.float32
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def cpu_has_fast_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags
