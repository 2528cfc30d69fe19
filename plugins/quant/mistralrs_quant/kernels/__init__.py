"""CPU execution paths for quantized matmuls (see ``qlinear`` for how one is chosen)."""
