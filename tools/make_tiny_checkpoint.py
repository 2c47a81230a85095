"""Build tiny random Hugging Face checkpoints with transformers (a test oracle; hpcmoe never imports it).

    python tools/make_tiny_checkpoint.py deepseek_v3 DIR [--set q_lora_rank=null] [--shards 3]

Weights use a larger std than transformers' default so logits are not all near zero, norms are
perturbed around one, and DeepSeek's router correction bias is random so that it changes choices.
"""
from __future__ import annotations

import argparse
import os

import torch
import yaml

FAMILIES = {
    "deepseek_v3": dict(vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
                        n_routed_experts=8, routed_scaling_factor=2.5, kv_lora_rank=16, q_lora_rank=24,
                        qk_rope_head_dim=8, v_head_dim=12, qk_nope_head_dim=8, n_group=4, topk_group=2,
                        num_experts_per_tok=2, first_k_dense_replace=1, max_position_embeddings=256,
                        rope_interleave=True, tie_word_embeddings=False),
    "mixtral": dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, num_local_experts=6, num_experts_per_tok=2,
                    max_position_embeddings=256, rope_theta=10000.0, tie_word_embeddings=False),
}


def build(family: str, seed: int = 0, std: float = 0.15, **overrides):
    """A transformers model of the family with seeded random weights."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, MixtralConfig, MixtralForCausalLM
    config_class, model_class = {"deepseek_v3": (DeepseekV3Config, DeepseekV3ForCausalLM),
                                 "mixtral": (MixtralConfig, MixtralForCausalLM)}[family]
    torch.manual_seed(seed)
    model = model_class(config_class(**{**FAMILIES[family], **overrides})).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.1 * torch.randn_like(param))
            else:
                param.normal_(0.0, std)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(0.3 * torch.randn_like(buffer))
    return model


def make(family: str, directory: str, shards: int = 1, seed: int = 0, **overrides):
    """Write the checkpoint (config.json + safetensors, sharded with an index when shards > 1)."""
    model = build(family, seed, **overrides)
    size = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    model.save_pretrained(directory, max_shard_size=size // shards + 1 if shards > 1 else "10GB")
    return model


def train_tokenizer(directory: str, text_file: str, vocab_size: int) -> None:
    """A byte-level BPE trained on `text_file`, saved as DIRECTORY/tokenizer.json: <unk> 0, <s> 1 (BOS,
    added by its post-processor), </s> 2 (EOS). For tests: tiny, but a real `tokenizers` tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    with open(text_file) as f:
        tokenizer.train_from_iterator(f.read().splitlines(), trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer.save(os.path.join(directory, "tokenizer.json"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("family", choices=sorted(FAMILIES))
    parser.add_argument("directory")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a transformers config field (value parsed as YAML)")
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", metavar="TEXT_FILE", help="also train a byte-level BPE on this text")
    args = parser.parse_args()
    overrides = {k: yaml.safe_load(v) for k, _, v in (item.partition("=") for item in args.set)}
    model = make(args.family, args.directory, args.shards, args.seed, **overrides)
    if args.tokenizer:
        train_tokenizer(args.directory, args.tokenizer, model.config.vocab_size)
    print(f"wrote {args.family} checkpoint to {args.directory}")


if __name__ == "__main__":
    main()
