"""Test-only multimodal family (``TinyMM``): encoder features spliced into placeholder
tokens and 3-axis M-RoPE positions, through the core's generic seams only."""
