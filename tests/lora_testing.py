"""Shared by the LoRA tests: a tiny random Llama and PEFT adapters made with peft."""
import copy
import json

import torch
import transformers

from mistralrs_core.adapters.loader import attach_lora
from mistralrs_core.testing.parity import load_for_test, perturb_parameters, save_reference
from mistralrs_core.testing.tiny import tokenizer_vocab_size, write_tiny_tokenizer


def peft_adapter(base, out, **cfg):
    """A random-valued PEFT adapter (both A and B non-zero) saved to ``out``."""
    import peft
    torch.manual_seed(len(out.name))
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **cfg))
    perturb_parameters(model, seed=len(out.name), scale=0.02)
    model.save_pretrained(str(out))
    return out


def make_tiny(d):
    """(transformers reference, base dir, adapters dir, vocab); adapters a, b, c."""
    base_dir = d / "base"
    base_dir.mkdir()
    write_tiny_tokenizer(base_dir)
    vocab = tokenizer_vocab_size(base_dir)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(cfg).eval()
    perturb_parameters(ref)
    save_reference(ref, base_dir)
    adapters = d / "adapters"
    peft_adapter(ref, adapters / "a", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"],
                 rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3})
    peft_adapter(ref, adapters / "b", r=8, lora_alpha=16, use_rslora=True,
                 target_modules=r".*\.(k_proj|o_proj|up_proj)")
    # LoRA on the LM head, and a whole MLP projection saved per adapter (modules_to_save).
    peft_adapter(ref, adapters / "c", r=4, lora_alpha=4, target_modules=["lm_head", "q_proj"],
                 modules_to_save=["down_proj"])
    return ref, base_dir, adapters, vocab


def ours(base_dir, adapters, names, default, merge=False):
    model = load_for_test(base_dir)
    attach_lora(model, [(n, adapters / n) for n in names], default, merge=merge)
    return model


def ordering(path, **kw):
    path.write_text(json.dumps(kw))
    return str(path)
