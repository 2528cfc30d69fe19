"""mistralrs-quant: GGUF and legacy GGML reading, ggml block formats and quantized linear layers.

Modules (imported on demand, so listing plugins stays cheap):

``formats``        block sizes, torch dequantizers/quantizers, ``GGML_TYPES`` registry
``gguf_reader``    ``open_gguf`` -> ``GGUFFile`` (memory-mapped, split files, clear errors)
``gguf_tokenizer`` ``tokenizer_from_gguf`` -> ``(tokenizers.Tokenizer, info)``
``gguf_config``    GGUF metadata -> HF config per architecture; ``gguf_names`` tensor names
``gguf_loader``    ``Which.GGUF`` (``load_gguf_model`` for tests)
``ggml_reader``    ``open_ggml``: legacy 'ggml'/'ggmf'/'ggjt' files; ``ggml_loader`` ``Which.GGML``
``qlinear``        ``GGMLQuantMethod`` (the core's ``QuantMethod``) and ``GGUFQuantizedWeight``
``real_models``    paths of the two real GGUF models shipped as PyPI test dependencies
"""
