"""DeepSeek-V3: DeepSeek-V2 with sigmoid routing scores, a score-correction bias used only
to choose experts, group-limited top-k (groups ranked by their two best scores) and
renormalised weights; rope pairs are interleaved only when ``rope_interleave``."""
from __future__ import annotations

from mistralrs_arch_text.deepseek_v2 import DeepseekV2ForCausalLM, mla_config
from mistralrs_core.layers.moe import MoEConfig


class DeepseekV3ForCausalLM(DeepseekV2ForCausalLM):
    @classmethod
    def config_from_hf(cls, hf):
        moe = MoEConfig(num_experts=0, top_k=0, intermediate_size=0, scoring="sigmoid",
                        score_correction_bias=True, n_group=hf.get("n_group"), topk_group=hf.get("topk_group"),
                        group_score="top2_sum", renormalize=bool(hf.get("norm_topk_prob", True)),
                        renormalize_eps=1e-20)
        return mla_config(hf, moe, rope_interleaved=bool(hf.get("rope_interleave", True)))
