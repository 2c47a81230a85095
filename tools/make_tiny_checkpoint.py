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
    "deepseek_v3": dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_shared_experts=1,
        n_routed_experts=8,
        routed_scaling_factor=2.5,
        kv_lora_rank=16,
        q_lora_rank=24,
        qk_rope_head_dim=8,
        v_head_dim=12,
        qk_nope_head_dim=8,
        n_group=4,
        topk_group=2,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        max_position_embeddings=256,
        rope_interleave=True,
        tie_word_embeddings=False,
    ),
    # gpt-oss: 4 layers alternate sliding (window 4: the tests' prompts cross it) and full attention
    "gpt_oss": dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=8,
        num_experts_per_tok=2,
        sliding_window=4,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    ),
    "glm4_moe": dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        routed_scaling_factor=2.0,
        attention_bias=True,
        use_qk_norm=True,
        partial_rotary_factor=0.5,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    ),
    "minimax_m2": dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=8,
        num_experts_per_tok=2,
        partial_rotary_factor=0.5,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    ),
    "qwen3_moe": dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        mlp_only_layers=[0],
        max_position_embeddings=256,
        tie_word_embeddings=False,
    ),
    "mixtral": dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=6,
        num_experts_per_tok=2,
        max_position_embeddings=256,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    ),
}


def build(family: str, seed: int = 0, std: float = 0.15, **overrides):
    """A transformers model of the family with seeded random weights."""
    from transformers import (
        DeepseekV3Config,
        DeepseekV3ForCausalLM,
        Glm4MoeConfig,
        Glm4MoeForCausalLM,
        GptOssConfig,
        GptOssForCausalLM,
        MiniMaxM2Config,
        MiniMaxM2ForCausalLM,
        MixtralConfig,
        MixtralForCausalLM,
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
    )

    config_class, model_class = {
        "deepseek_v3": (DeepseekV3Config, DeepseekV3ForCausalLM),
        "glm4_moe": (Glm4MoeConfig, Glm4MoeForCausalLM),
        "gpt_oss": (GptOssConfig, GptOssForCausalLM),
        "minimax_m2": (MiniMaxM2Config, MiniMaxM2ForCausalLM),
        "mixtral": (MixtralConfig, MixtralForCausalLM),
        "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM),
    }[family]
    torch.manual_seed(seed)
    model = model_class(config_class(**{**FAMILIES[family], **overrides})).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.1 * torch.randn_like(param))
            elif name.endswith("sinks"):  # gpt-oss: logits of the size of the attention scores'
                param.normal_(0.0, 1.0)
            else:
                param.normal_(0.0, std)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(0.3 * torch.randn_like(buffer))
    return model


def make(family: str, directory: str, shards: int = 1, seed: int = 0, mxfp4: bool = False, **overrides):
    """Write the checkpoint (config.json + safetensors, sharded with an index when shards > 1). With
    mxfp4 (gpt_oss) the experts are first rounded to MXFP4, then stored as MXFP4 blocks and
    exponents; the model returned holds the rounded weights (save it for the dequantized twin)."""
    model = build(family, seed, **overrides)
    if mxfp4:
        round_experts_to_mxfp4(model)
    size = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    model.save_pretrained(directory, max_shard_size=size // shards + 1 if shards > 1 else "10GB")
    if mxfp4:
        rewrite(
            directory,
            mxfp4_tensors,
            {
                "quant_method": "mxfp4",
                "modules_to_not_convert": [
                    "model.layers.*.self_attn",
                    "model.layers.*.mlp.router",
                    "model.embed_tokens",
                    "lm_head",
                ],
            },
        )
    return model


MXFP4_STACKED = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")  # [E, in, out] each


@torch.no_grad()
def round_experts_to_mxfp4(model) -> None:
    """Every expert weight to its nearest MXFP4 value, in place (the dequantized twin's weights)."""
    from hpcmoe.model import mxfp4

    for name, param in model.named_parameters():
        if name.endswith(MXFP4_STACKED):
            for e in range(param.shape[0]):
                param[e] = mxfp4.dequantize(*mxfp4.quantize(param[e].t())).t()


def mxfp4_tensors(name: str, tensor: torch.Tensor) -> dict:
    """gpt-oss's published layout: NAME_blocks [E, out, in / 32, 16] and NAME_scales [E, out, in / 32]."""
    if not name.endswith(MXFP4_STACKED):
        return {name: tensor}
    from hpcmoe.model import mxfp4

    parts = [mxfp4.quantize(tensor[e].t()) for e in range(tensor.shape[0])]
    return {
        name + "_blocks": torch.stack([b for b, _ in parts]),
        name + "_scales": torch.stack([s for _, s in parts]),
    }


def train_tokenizer(directory: str, text_file: str, vocab_size: int) -> None:
    """A byte-level BPE trained on `text_file`, saved as DIRECTORY/tokenizer.json: <unk> 0, <s> 1 (BOS,
    added by its post-processor), </s> 2 (EOS). For tests: tiny, but a real `tokenizers` tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    with open(text_file) as f:
        tokenizer.train_from_iterator(f.read().splitlines(), trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    if tokenizer.get_vocab_size() > vocab_size:
        raise SystemExit(
            f"make_tiny_checkpoint: a byte-level tokenizer needs {tokenizer.get_vocab_size()} ids but the "
            f"model's vocabulary has {vocab_size}: use --set vocab_size=320"
        )
    tokenizer.save(os.path.join(directory, "tokenizer.json"))


FP8_MAX = 448.0  # largest float8_e4m3fn


def block_quantize(weight: torch.Tensor, block: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's recipe: per block of rows x columns, scale = amax / 448 (the stored
    weight_scale_inv), weight / scale rounded to float8_e4m3fn; edge blocks are partial."""
    rows, columns = weight.shape
    r, c = -(-rows // block[0]), -(-columns // block[1])
    padded = torch.zeros(r * block[0], c * block[1])
    padded[:rows, :columns] = weight.float()
    blocks = padded.view(r, block[0], c, block[1])
    scale = (blocks.abs().amax(dim=(1, 3)) / FP8_MAX).clamp(min=1e-12)
    quantized = (blocks / scale[:, None, :, None]).view(r * block[0], c * block[1])[:rows, :columns]
    return quantized.to(torch.float8_e4m3fn), scale


def quantizable(name: str, tensor: torch.Tensor) -> bool:
    """Every linear weight but the embedding, the LM head and the router gate (as DeepSeek-V3 ships)."""
    return (
        tensor.dim() == 2
        and name.endswith(".weight")
        and "embed_tokens" not in name
        and "lm_head" not in name
        and not name.endswith("mlp.gate.weight")
    )


def quantize_fp8(directory: str, block: list[int]) -> None:
    """Turn the checkpoint in `directory` into DeepSeek-V3's FP8 format in place."""

    def convert(name, tensor):
        if not quantizable(name, tensor):
            return {name: tensor}
        weight, scale = block_quantize(tensor, block)
        return {name: weight, name + "_scale_inv": scale}

    rewrite(
        directory,
        convert,
        {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": list(block),
        },
    )


def rewrite(directory: str, convert, quantization_config: dict) -> None:
    """Every tensor of the checkpoint in `directory` through convert(name, tensor) -> {name: tensor},
    in place (shards and index kept), and config.json given the quantization_config."""
    import glob
    import json

    from safetensors.torch import load_file, save_file

    names = {}
    for path in sorted(glob.glob(os.path.join(directory, "*.safetensors"))):
        stored = {}
        for name, tensor in load_file(path).items():
            stored.update(convert(name, tensor))
        save_file(stored, path, metadata={"format": "pt"})
        names.update({name: os.path.basename(path) for name in stored})
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            meta = json.load(f)
        meta["weight_map"] = names
        with open(index, "w") as f:
            json.dump(meta, f, indent=1)
    config_path = os.path.join(directory, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["quantization_config"] = quantization_config
    with open(config_path, "w") as f:
        json.dump(config, f, indent=1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("family", choices=sorted(FAMILIES))
    parser.add_argument("directory")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a transformers config field (value parsed as YAML)",
    )
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", metavar="TEXT_FILE", help="also train a byte-level BPE on this text")
    parser.add_argument(
        "--fp8",
        type=int,
        nargs=2,
        metavar=("ROWS", "COLUMNS"),
        help="store linear weights as FP8 with a scale per block (DeepSeek-V3 uses 128 128)",
    )
    parser.add_argument(
        "--mxfp4", action="store_true", help="gpt_oss: store the experts as MXFP4, as gpt-oss is published"
    )
    parser.add_argument(
        "--twin", metavar="DIR", help="with --mxfp4: also write the dequantized twin (float32) here"
    )
    args = parser.parse_args()
    if (args.mxfp4 or args.twin) and (args.family != "gpt_oss" or not args.mxfp4):
        parser.error("--mxfp4 is for the gpt_oss family; --twin needs --mxfp4")
    overrides = {k: yaml.safe_load(v) for k, _, v in (item.partition("=") for item in args.set)}
    if args.tokenizer:  # a byte-level BPE needs 256 byte ids and 3 special ones, and some merges
        overrides.setdefault("vocab_size", 320)
    model = make(args.family, args.directory, args.shards, args.seed, args.mxfp4, **overrides)
    if args.twin:
        model.save_pretrained(args.twin)
    if args.tokenizer:
        train_tokenizer(args.directory, args.tokenizer, model.config.vocab_size)
    if args.fp8:
        quantize_fp8(args.directory, args.fp8)
    print(f"wrote {args.family} checkpoint to {args.directory}")


if __name__ == "__main__":
    main()
