"""Triton kernels for CUDA: quantized matmuls that read packed weights in place
(``quant_matmul`` with the per-format decoders of ``block_decode``) and a paged-attention
decode kernel (``paged_attention``). Only ``dispatch`` may be imported without triton
installed; it decides, in one place, when the kernels run."""
