"""`vla-export --onnx OUT`: export a Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoint for the onnxruntime backend.

The export folder runs on its own (no torch, no transformers) with
:class:`vla_node.backends.onnx_backend.OnnxBackend`:

* ``vision.onnx``  patches -> merged image embeddings. Everything that depends on the image grid
  (rotary position ids; Qwen2.5-VL's window order and window attention bias; Qwen3-VL's learned
  position embedding resampled to the grid, as gather indices + bilinear weights) is an input
  computed in numpy by the backend, so one graph serves every image size (legacy
  ``torch.onnx.export`` would otherwise bake the grid of the example image into the graph).
  Qwen3-VL's graph has a second output, ``deepstack_embeds`` (one row of merged features per
  ``deepstack_visual_indexes`` block, stacked: layers x image tokens x hidden).
* ``decoder.onnx`` inputs_embeds + 3D M-RoPE position ids + past key/values -> last-token logits +
  present key/values (explicit KV-cache inputs/outputs, causal mask built from the shapes). Qwen3-VL's
  also takes ``deepstack_embeds`` and ``visual_positions`` (the image tokens' indices within this
  call's sequence) and adds row ``i`` to those positions after decoder layer ``i``, as transformers
  does; a decode step passes zero image tokens. Its interleaved M-RoPE and q/k norms are the
  checkpoint's own modules, traced.
* ``embed_tokens.npy`` the token embedding table (the lookup and the image-feature merge are numpy).
* ``tokenizer.json``, ``chat_template.jinja``, ``config.json``, ``generation_config.json``,
  ``processor_config.json``/``preprocessor_config.json``, ``vla_manifest.json`` (when the model has
  one) and ``onnx_manifest.json`` (shapes, token ids, image settings, provenance).

Other model types are refused with the supported list.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import warnings
from pathlib import Path

log = logging.getLogger("vla_export.onnx")

__all__ = ["export_onnx", "OnnxExportError", "ONNX_FORMAT", "FAMILIES"]

ONNX_FORMAT = 1
FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
_COPIED_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "config.json",
    "generation_config.json",
    "processor_config.json",
    "preprocessor_config.json",
    "vla_manifest.json",
)


class OnnxExportError(ValueError):
    """The checkpoint cannot be exported to ONNX; the message says why."""


def _refuse_unsupported(model_dir: Path) -> dict:
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise OnnxExportError(f"{model_dir}: no config.json (not a Hugging Face checkpoint)")
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    model_type = cfg.get("model_type")
    if model_type not in FAMILIES:
        raise OnnxExportError(
            f"{model_dir}: model_type {model_type!r} cannot be exported to ONNX (supported: {', '.join(FAMILIES)}); "
            "serve it with backend 'transformers'"
        )
    return cfg


def _build_wrappers(model):
    """torch modules with plain-tensor signatures that reuse the checkpoint's own submodules:
    (vision encoder, text decoder) for the checkpoint's family."""
    import torch
    from torch import nn

    def rotate_half(x):
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    def vision_attention(attn, x, cos, sin, bias):
        n = x.shape[0]
        q, k, v = attn.qkv(x).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        c, s = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()
        q = q * c + rotate_half(q) * s
        k = k * c + rotate_half(k) * s
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))  # heads, n, head_dim
        scores = torch.matmul(q, k.transpose(1, 2)) * attn.scaling
        if bias is not None:
            scores = scores + bias
        probs = torch.softmax(scores.float(), dim=-1)
        out = torch.matmul(probs, v).transpose(0, 1).reshape(n, -1)
        return attn.proj(out)

    def patch_embed(embed, pixel_values):
        """The patch embedding as one matmul: its Conv3d has kernel == stride == one patch, so it is a
        linear map of each flattened patch (rows of ``pixel_values`` are flattened in the conv weight's
        (channel, time, y, x) order). Traced as a Conv it took onnxruntime 13 ms of a 75 ms vision call on
        one CPU core; as a matmul the call is ~6 ms shorter."""
        conv = embed.proj
        if not (isinstance(conv, nn.Conv3d) and tuple(conv.kernel_size) == tuple(conv.stride)
                and conv.padding in ((0, 0, 0), "valid") and conv.groups == 1):
            return embed(pixel_values)
        weight = conv.weight.reshape(conv.out_channels, -1)
        return torch.nn.functional.linear(pixel_values.to(weight.dtype), weight, conv.bias)

    visual = model.model.visual
    language = model.model.language_model
    deepstack = hasattr(visual, "deepstack_merger_list")  # Qwen3-VL
    if deepstack:
        from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb
    else:
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb

    class VisionEncoder(nn.Module):
        """Qwen2-VL / Qwen2.5-VL: window order and window attention bias come in as inputs."""

        def __init__(self):
            super().__init__()
            self.visual = visual
            vcfg = visual.config
            self.unit = int(vcfg.spatial_merge_size) ** 2
            self.full_blocks = set(getattr(visual, "fullatt_block_indexes", None) or range(len(visual.blocks)))
            self.windowed = len(self.full_blocks) < len(visual.blocks)

        def _permute(self, x, window_index):
            n = x.shape[0]
            return x.reshape(n // self.unit, self.unit, -1)[window_index].reshape(n, -1)

        def forward(self, pixel_values, position_ids, window_index, reverse_index, window_bias=None):
            h = patch_embed(self.visual.patch_embed, pixel_values)
            h = self._permute(h, window_index)
            cos, sin = self.visual.rotary_pos_emb(h, position_ids)
            cos, sin = self._permute(cos, window_index), self._permute(sin, window_index)
            for i, blk in enumerate(self.visual.blocks):
                bias = None if i in self.full_blocks else window_bias
                h = h + vision_attention(blk.attn, blk.norm1(h), cos, sin, bias)
                h = h + blk.mlp(blk.norm2(h))
            return self.visual.merger(h)[reverse_index]

    class DeepstackVisionEncoder(nn.Module):
        """Qwen3-VL: full attention in every block; the learned position embedding is resampled to the
        grid by the gather indices and bilinear weights given as inputs; also returns the deepstack
        features (the merged output of each ``deepstack_visual_indexes`` block), stacked."""

        windowed = False

        def __init__(self):
            super().__init__()
            self.visual = visual
            self.deepstack_indexes = list(visual.deepstack_visual_indexes)

        def forward(self, pixel_values, position_ids, interp_indices, interp_weights):
            h = patch_embed(self.visual.patch_embed, pixel_values)
            h = h + (self.visual.pos_embed(interp_indices) * interp_weights[:, :, None]).sum(1)
            cos, sin = self.visual.rotary_pos_emb(h, position_ids)
            features = []
            for i, blk in enumerate(self.visual.blocks):
                h = h + vision_attention(blk.attn, blk.norm1(h), cos, sin, None)
                h = h + blk.mlp(blk.norm2(h))
                if i in self.deepstack_indexes:
                    merger = self.visual.deepstack_merger_list[self.deepstack_indexes.index(i)]
                    features.append(merger(h))
            return self.visual.merger(h), torch.stack(features)

    class TextDecoder(nn.Module):
        """One decoder call (prompt or decode step) with an explicit KV cache. With ``deepstack_layers``
        (Qwen3-VL) two more inputs follow the position ids: ``deepstack_embeds`` (layers x image tokens
        x hidden) and ``visual_positions`` (those tokens' indices in this call's sequence)."""

        def __init__(self, deepstack_layers: int = 0):
            super().__init__()
            self.layers = language.layers
            self.norm = language.norm
            self.rotary = language.rotary_emb
            self.lm_head = model.lm_head
            self.deepstack_layers = deepstack_layers

        @staticmethod
        def _heads(projected, norm, seq, head_dim):
            """(1, heads, seq, head_dim); Qwen3-VL RMS-normalises each head (q_norm, k_norm) first."""
            split = projected.view(1, seq, -1, head_dim)
            return (split if norm is None else norm(split)).transpose(1, 2)

        def forward(self, inputs_embeds, position_ids, *rest):
            if self.deepstack_layers:
                deepstack_embeds, visual_positions, *past = rest
            else:
                past = rest
            cos, sin = self.rotary(inputs_embeds, position_ids)
            seq = inputs_embeds.shape[1]
            past_len = past[0].shape[2]
            q_pos = torch.arange(seq, dtype=torch.int64) + past_len
            k_pos = torch.arange(seq + past_len, dtype=torch.int64)
            allowed = k_pos.unsqueeze(0) <= q_pos.unsqueeze(1)
            mask = torch.where(allowed, 0.0, torch.finfo(torch.float32).min).to(inputs_embeds.dtype)
            h = inputs_embeds
            presents = []
            for i, layer in enumerate(self.layers):
                attn = layer.self_attn
                x = layer.input_layernorm(h)
                q = self._heads(attn.q_proj(x), getattr(attn, "q_norm", None), seq, attn.head_dim)
                k = self._heads(attn.k_proj(x), getattr(attn, "k_norm", None), seq, attn.head_dim)
                v = self._heads(attn.v_proj(x), None, seq, attn.head_dim)
                q, k = apply_rotary_pos_emb(q, k, cos, sin)
                k = torch.cat([past[2 * i], k], dim=2)
                v = torch.cat([past[2 * i + 1], v], dim=2)
                presents += [k, v]
                groups = attn.num_key_value_groups
                kr = k.repeat_interleave(groups, dim=1) if groups > 1 else k
                vr = v.repeat_interleave(groups, dim=1) if groups > 1 else v
                scores = torch.matmul(q, kr.transpose(2, 3)) * attn.scaling + mask
                probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
                out = torch.matmul(probs, vr).transpose(1, 2).reshape(1, seq, -1)
                h = h + attn.o_proj(out)
                h = h + layer.mlp(layer.post_attention_layernorm(h))
                if i < self.deepstack_layers:
                    # transformers' _deepstack_process: hidden[image tokens] += that layer's visual features.
                    # gather + scatter (GatherElements / ScatterElements) rather than index_put, whose
                    # TorchScript export bakes the example's shapes; zero image tokens leave h as it is
                    where = visual_positions[:, None].expand(-1, h.shape[-1])
                    rows = h[0].gather(0, where) + deepstack_embeds[i]
                    h = h[0].scatter(0, where, rows).unsqueeze(0)
            logits = self.lm_head(self.norm(h[:, -1, :]))
            return (logits, *presents)

    if deepstack:
        return DeepstackVisionEncoder(), TextDecoder(len(visual.deepstack_visual_indexes))
    return VisionEncoder(), TextDecoder()


def export_onnx(model: str, out: str, adapter: str | None = None, opset: int = 17,
                quantize: str | None = None, _provenance: dict | None = None) -> Path:
    """Export ``model`` (optionally with ``adapter`` merged in first) to the folder ``out``;
    ``quantize`` ("int4", training.onnx_quantize) stores the decoder's weights in 4 bits."""
    model_dir, out_dir = Path(model), Path(out)
    if quantize is not None:  # refused before anything is written
        from training.onnx_quantize import QUANTIZATIONS, quantizer_unavailable

        if quantize not in QUANTIZATIONS:
            raise OnnxExportError(f"unknown quantization {quantize!r} (supported: {', '.join(QUANTIZATIONS)})")
        missing = quantizer_unavailable()
        if missing:
            raise OnnxExportError(missing)
    if adapter:
        from training.merge import export_merged

        _refuse_unsupported(model_dir)
        with tempfile.TemporaryDirectory(prefix="vla_onnx_merge_") as tmp:
            merged = export_merged(model, adapter, tmp)
            return export_onnx(str(merged), out, adapter=None, opset=opset, quantize=quantize,
                               _provenance={"source_model": str(model_dir), "merged_adapter": str(adapter)})
    cfg = _refuse_unsupported(model_dir)
    if out_dir.exists() and out_dir.resolve() == model_dir.resolve():
        raise OnnxExportError("--onnx must be a new directory, not the model directory")

    import numpy as np
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vla_node import manifest as mf

    hf = AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=torch.float32,
                                                     attn_implementation="eager")
    hf.eval()
    processor = AutoProcessor.from_pretrained(str(model_dir))
    vision, decoder = _build_wrappers(hf)
    deepstack_layers = decoder.deepstack_layers  # 0 but for Qwen3-VL
    if deepstack_layers:
        # the backend resamples the learned position grid with 4 bilinear taps (numpy); refuse anything else
        interpolation = str(getattr(hf.model.visual, "interpolation_mode", "bilinear"))
        if interpolation != "bilinear":
            raise OnnxExportError(f"{model_dir}: vision position embeddings resampled {interpolation!r}; "
                                  "the onnx backend implements 'bilinear' only")
    out_dir.mkdir(parents=True, exist_ok=True)

    tcfg = hf.config.text_config
    vcfg = hf.config.vision_config
    layers = int(tcfg.num_hidden_layers)
    kv_heads = int(tcfg.num_key_value_heads)
    head_dim = int(getattr(tcfg, "head_dim", None) or int(tcfg.hidden_size) // int(tcfg.num_attention_heads))
    hidden = int(tcfg.hidden_size)
    ip = processor.image_processor
    patch, merge, temporal = int(ip.patch_size), int(ip.merge_size), int(ip.temporal_patch_size)
    unit = merge * merge

    with torch.inference_mode(), warnings.catch_warnings():
        # the TorchScript exporter is chosen on purpose (deprecated, but it traces these plain-tensor
        # wrappers reliably with dynamic axes); silence its deprecation notice
        warnings.simplefilter("ignore", DeprecationWarning)
        # example: a 4x8-patch image (2 merged tokens x 4 = 8 merge units)
        gh, gw = 2 * merge, 4 * merge
        n = gh * gw
        pixel_values = torch.randn(n, 3 * temporal * patch * patch)
        pos = np.stack(np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij"), -1).reshape(-1, 2)
        position_ids = torch.from_numpy(pos.astype(np.int64))
        if deepstack_layers:
            taps = int(hf.model.visual.pos_embed.num_embeddings)
            vision_inputs = [pixel_values, position_ids, torch.randint(0, taps, (n, 4)), torch.rand(n, 4)]
            vision_names = ["pixel_values", "position_ids", "interp_indices", "interp_weights"]
            vision_outputs = ["image_embeds", "deepstack_embeds"]
            dynamic = {"pixel_values": {0: "patches"}, "position_ids": {0: "patches"},
                       "interp_indices": {0: "patches"}, "interp_weights": {0: "patches"},
                       "image_embeds": {0: "tokens"}, "deepstack_embeds": {1: "tokens"}}
        else:
            window_index = torch.arange(n // unit, dtype=torch.int64)
            vision_inputs = [pixel_values, position_ids, window_index, window_index.clone()]
            vision_names = ["pixel_values", "position_ids", "window_index", "reverse_index"]
            vision_outputs = ["image_embeds"]
            dynamic = {"pixel_values": {0: "patches"}, "position_ids": {0: "patches"},
                       "window_index": {0: "tokens"}, "reverse_index": {0: "tokens"},
                       "image_embeds": {0: "tokens"}}
        if vision.windowed:
            vision_inputs.append(torch.zeros(n, n))
            vision_names.append("window_bias")
            dynamic["window_bias"] = {0: "patches", 1: "patches_k"}
        torch.onnx.export(vision, tuple(vision_inputs), str(out_dir / "vision.onnx"), input_names=vision_names,
                          output_names=vision_outputs, dynamic_axes=dynamic, opset_version=opset,
                          dynamo=False)

        seq, past_len = 5, 3
        past = []
        past_names, present_names = [], []
        dyn = {"inputs_embeds": {1: "seq"}, "position_ids": {2: "seq"}}
        for i in range(layers):
            for kind in ("key", "value"):
                past.append(torch.randn(1, kv_heads, past_len, head_dim))
                past_names.append(f"past_{kind}_{i}")
                present_names.append(f"present_{kind}_{i}")
                dyn[f"past_{kind}_{i}"] = {2: "past"}
                dyn[f"present_{kind}_{i}"] = {2: "total"}
        embeds = torch.randn(1, seq, hidden)
        pos3 = torch.arange(past_len, past_len + seq).view(1, 1, -1).expand(3, 1, seq).contiguous()
        deepstack_inputs, deepstack_names = [], []
        if deepstack_layers:  # 2 of the 5 example tokens are image tokens
            deepstack_inputs = [torch.randn(deepstack_layers, 2, hidden), torch.tensor([1, 2], dtype=torch.int64)]
            deepstack_names = ["deepstack_embeds", "visual_positions"]
            dyn.update({"deepstack_embeds": {1: "visual"}, "visual_positions": {0: "visual"}})
        decoder_names = ["inputs_embeds", "position_ids", *deepstack_names, *past_names]
        torch.onnx.export(decoder, (embeds, pos3, *deepstack_inputs, *past), str(out_dir / "decoder.onnx"),
                          input_names=decoder_names,
                          output_names=["logits", *present_names], dynamic_axes=dyn, opset_version=opset,
                          dynamo=False)

    embed = hf.model.language_model.embed_tokens.weight.detach().float().numpy()
    np.save(out_dir / "embed_tokens.npy", embed)
    for name in _COPIED_FILES:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, out_dir / name)
    if not (out_dir / "chat_template.jinja").is_file():
        template = getattr(processor, "chat_template", None) or getattr(processor.tokenizer, "chat_template", None)
        if not template:
            raise OnnxExportError(f"{model_dir}: no chat template found (processor or tokenizer)")
        (out_dir / "chat_template.jinja").write_text(template, encoding="utf-8")
    if not (out_dir / "tokenizer.json").is_file():
        processor.tokenizer.save_pretrained(str(out_dir))

    tok = processor.tokenizer
    eos = []
    gen_eos = getattr(hf.generation_config, "eos_token_id", None)
    for e in gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]:
        if e is not None and int(e) not in eos:
            eos.append(int(e))
    for t in ("<|im_end|>", "<|endoftext|>"):
        i = tok.convert_tokens_to_ids(t)
        if isinstance(i, int) and i >= 0 and i not in eos:
            eos.append(i)
    size = ip.size
    min_pixels = size.get("shortest_edge") if isinstance(size, dict) else getattr(size, "shortest_edge", None)
    max_pixels = size.get("longest_edge") if isinstance(size, dict) else getattr(size, "longest_edge", None)
    manifest = {
        "format": ONNX_FORMAT,
        "family": cfg["model_type"],
        "coordinate_convention": mf.coordinate_convention_of(model_dir),
        "source_model": str(model_dir),
        "merged_adapter": "",
        "source_config_sha256": mf.config_sha256(model_dir),
        "num_layers": layers,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_size": hidden,
        "vocab_size": int(embed.shape[0]),
        "eos_token_ids": eos,
        "image_token_id": int(hf.config.image_token_id),
        "vision_start_token_id": int(hf.config.vision_start_token_id),
        "vision_inputs": vision_names,
        "vision": {
            "patch_size": patch,
            "merge_size": merge,
            "temporal_patch_size": temporal,
            "window_size": int(getattr(vcfg, "window_size", 0) or 0),
            "windowed": bool(vision.windowed),
            "image_mean": [float(x) for x in ip.image_mean],
            "image_std": [float(x) for x in ip.image_std],
            "rescale_factor": float(ip.rescale_factor),
            "min_pixels": int(min_pixels),
            "max_pixels": int(max_pixels),
        },
    }
    # the source model's calibrated one, if any (a merged checkpoint carries its adapter's manifest:
    # the adapter's own, never the base's)
    clarify_threshold = mf.clarify_threshold_of(model_dir)
    if clarify_threshold is not None:
        manifest["clarify_threshold"] = clarify_threshold
    if mf.answers_count_questions(model_dir):  # vla_node.presence_check may ask it
        manifest["count_questions"] = True
    if deepstack_layers:
        visual = hf.model.visual
        manifest["deepstack_layers"] = deepstack_layers
        manifest["deepstack_visual_indexes"] = [int(i) for i in visual.deepstack_visual_indexes]
        manifest["vision"]["position_embedding"] = {
            "grid_per_side": int(visual.num_grid_per_side),
            "interpolation": interpolation,
            "align_corners": bool(visual.interpolation_align_corners),
        }
    manifest.update(_provenance or {})
    (out_dir / "onnx_manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    if quantize is not None:
        from training.onnx_quantize import quantize_decoder

        quantize_decoder(out_dir, quantize)
    log.info("exported %s to ONNX in %s", model_dir, out_dir)
    return out_dir
