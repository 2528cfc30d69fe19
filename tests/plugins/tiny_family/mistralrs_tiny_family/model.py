"""A small pre-norm decoder composed only from mistralrs_core's shared layers."""
from mistralrs_core.layers.rope import RopeConfig
from mistralrs_core.models.decoder import DecoderConfig, DecoderLM


class TinyForCausalLM(DecoderLM):
    @classmethod
    def config_from_hf(cls, hf):
        hd = hf["hidden_size"] // hf["num_attention_heads"]
        return DecoderConfig(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"], num_kv_heads=hf["num_key_value_heads"], head_dim=hd,
            rope=RopeConfig.from_hf(hf, hd), max_position_embeddings=hf["max_position_embeddings"],
            norm_eps=hf["rms_norm_eps"], tie_word_embeddings=hf.get("tie_word_embeddings", False))
