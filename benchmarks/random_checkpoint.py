"""Random-weight checkpoints with the public Qwen2.5-VL-3B / Qwen3-VL-2B architectures (no download).

Speed depends on the architecture, not on the weights, so the GPU benchmarks build the real
shapes with random bf16 weights directly on the device and save them as an ordinary checkpoint
directory, which the node then loads exactly like a downloaded one. The tokenizer is the small
locally trained BPE of training.tiny_models (its ids are all valid in the 151936-entry vocabulary).

Two edits keep a random model honest for timing: the embedding rows of the end-of-sequence ids
and of ids the small tokenizer does not have are zeroed (tied embeddings: their logits become 0
while the random ones have a positive maximum), so greedy decoding never stops early and always
emits decodable tokens. Compute per token is unchanged.
"""
from __future__ import annotations

from pathlib import Path

# Public configs (Qwen/Qwen2.5-VL-3B-Instruct, Qwen/Qwen3-VL-2B-Instruct config.json), plus a
# shrunken "tiny" variant of each for CPU smoke runs. Keys: text, vision, processor limits.
ARCHITECTURES: dict[str, dict] = {
    "qwen2_5_vl_3b": {
        "family": "qwen2_5_vl",
        "text": dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                     num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=128000,
                     rms_norm_eps=1e-6, tie_word_embeddings=True,
                     rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}),
        "vision": dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                       patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                       fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2),
        "pixels": (3136, 12845056),
    },
    "qwen3_vl_2b": {
        "family": "qwen3_vl",
        "text": dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                     num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
                     rms_norm_eps=1e-6, tie_word_embeddings=True,
                     rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                                      "mrope_section": [24, 20, 20], "mrope_interleaved": True}),
        "vision": dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2048,
                       patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                       deepstack_visual_indexes=[5, 11, 17], hidden_act="gelu_pytorch_tanh"),
        "pixels": (65536, 16777216),
    },
}
TINY: dict[str, dict] = {
    "qwen2_5_vl_3b": {
        "text": dict(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2,
                     rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]}),
        "vision": dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                       fullatt_block_indexes=[1]),
    },
    "qwen3_vl_2b": {
        "text": dict(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                     rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                                      "mrope_section": [3, 3, 2], "mrope_interleaved": True}),
        "vision": dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                       deepstack_visual_indexes=[0]),
    },
}


def architecture(name: str, tiny: bool = False) -> dict:
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}")
    spec = {key: (dict(value) if isinstance(value, dict) else value) for key, value in ARCHITECTURES[name].items()}
    if tiny:
        spec["text"].update(TINY[name]["text"])
        spec["vision"].update(TINY[name]["vision"])
    return spec


def build_config(spec: dict, tokenizer):
    from training.tiny_models import QWEN_SPECIAL_TOKENS

    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL_TOKENS}
    text = dict(spec["text"], bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"])
    if text["vocab_size"] < len(tokenizer):
        raise ValueError(f"vocab_size {text['vocab_size']} < tokenizer size {len(tokenizer)}")
    token_ids = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                     vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    if spec["family"] == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig as Config
    else:
        from transformers import Qwen3VLConfig as Config
    return Config(text_config=text, vision_config=dict(spec["vision"]),
                  tie_word_embeddings=text["tie_word_embeddings"] if "tie_word_embeddings" in text else True,
                  **token_ids)


def build_random_checkpoint(out_dir, name: str, device: str = "cuda", dtype: str = "bfloat16",
                            tiny: bool = False, seed: int = 0) -> Path:
    """Write a random-weight checkpoint of architecture `name` to out_dir (built on `device`)."""
    import torch
    from transformers import AutoModelForImageTextToText, GenerationConfig

    from training.tiny_models import _build_processor, default_corpus, train_tokenizer

    spec = architecture(name, tiny)
    family = spec["family"]
    tokenizer = train_tokenizer(default_corpus(), vocab_size=3000, family=family)
    min_pixels, max_pixels = spec["pixels"]
    processor = _build_processor(family, tokenizer, min_pixels, max_pixels)
    config = build_config(spec, tokenizer)

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=getattr(torch, dtype))
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    end_of_text = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    with torch.no_grad():
        for embedding in {id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings())}.values():
            embedding.weight[len(tokenizer):] = 0
            embedding.weight[[im_end, end_of_text]] = 0
    model.generation_config = GenerationConfig(bos_token_id=end_of_text, eos_token_id=[im_end, end_of_text],
                                               pad_token_id=end_of_text, do_sample=False)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out


def build_random_adapter(checkpoint, out_dir, device: str = "cuda", rank: int = 16, seed: int = 1) -> Path:
    """Write a random LoRA adapter for ``checkpoint`` to out_dir: rank ``rank`` on every linear layer
    of the language model (vla-train's default targets: training.train.lora_target_regex), A and B
    both random, so its updates change every product, as a trained adapter's do."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    from training.train import lora_target_regex

    model = AutoModelForImageTextToText.from_pretrained(str(checkpoint), dtype=torch.bfloat16, device_map=device)
    torch.manual_seed(seed)
    targets, _ = lora_target_regex(model, "all")
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, lora_dropout=0.0,
                        init_lora_weights=False)
    out = Path(out_dir)
    get_peft_model(model, config).save_pretrained(str(out))
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out
