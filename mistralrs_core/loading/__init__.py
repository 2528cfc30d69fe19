"""Finding model files (local or Hugging Face Hub) and reading weights and configs."""

from .hf_config import (
    config_eos_token_ids,
    load_generation_config,
    load_json,
    load_model_config,
    max_context_length,
)
from .resolve import hub_offline, parse_token_source, resolve_file, resolve_model_dir
from .safetensors_io import SafetensorsWeights, find_safetensors_files

__all__ = [
    "SafetensorsWeights",
    "config_eos_token_ids",
    "find_safetensors_files",
    "hub_offline",
    "load_generation_config",
    "load_json",
    "load_model_config",
    "max_context_length",
    "parse_token_source",
    "resolve_file",
    "resolve_model_dir",
]
