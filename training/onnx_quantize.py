"""`vla-export --onnx OUT --quantize int4`: the decoder's weights stored in 4 bits for a CPU robot.

A decoded token reads every decoder weight once; on a CPU core that read, not arithmetic, bounds the
step. ``int4`` replaces each of the decoder's constant-weight MatMuls (attention and MLP projections,
the LM head) with onnxruntime's ``MatMulNBits``: weights in 4 bits with one float scale per block of
32 inputs (symmetric), activations quantised to int8 per block on the fly (``accuracy_level`` 4, the
integer kernels onnxruntime's CPU provider has for AVX2 and up). The vision encoder stays float32:
its matmuls run on hundreds of patches at once (arithmetic-bound, so 4-bit weights do not speed it
up), and quantising its activations per tensor cost accuracy (benchmarks/README.md, session 26).

Measured on the embedded model (benchmarks/results/onnx_int4_cpu.txt, cpu_latency.txt): on 400
held-out commands a language the same plan exact match as float32 (English 0.9825, Chinese with the
adapter merged 0.980); a decode step 3.2 -> 1.3-1.5 ms on one thread, the node's English p50 1.5x
faster. Other models: measure before serving (`vla-eval --backend onnx`, benchmarks/onnx_int4.py).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger("vla_export.onnx")

__all__ = ["QUANTIZATIONS", "quantize_decoder", "quantizer_unavailable"]

QUANTIZATIONS = ("int4",)
_BLOCK_SIZE = 32
_ACCURACY_LEVEL = 4  # int8 activations: the fast MLAS kernels (level 0, float activations, measured 2x slower)


def quantizer_unavailable() -> str | None:
    """Why this host cannot quantise (onnx or onnxruntime's quantizer missing), or None."""
    try:
        import onnx  # noqa: F401
        from onnxruntime.quantization import matmul_nbits_quantizer  # noqa: F401
    except ImportError as e:
        return f"--quantize needs onnx and onnxruntime>=1.22 (pip install \"vla_node[export]\"): {e}"
    return None


def quantize_decoder(export_dir: str | Path, scheme: str = "int4") -> dict:
    """Quantise ``export_dir``'s decoder.onnx in place and record the scheme in onnx_manifest.json
    (``decoder_weights``); returns that record."""
    if scheme not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {scheme!r} (supported: {', '.join(QUANTIZATIONS)})")
    missing = quantizer_unavailable()
    if missing:
        raise ValueError(missing)
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    export_dir = Path(export_dir)
    decoder = export_dir / "decoder.onnx"
    manifest_path = export_dir / "onnx_manifest.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    if manifest.get("decoder_weights", {}).get("scheme", "float32") != "float32":
        raise ValueError(f"{export_dir}: the decoder is already quantised ({manifest['decoder_weights']['scheme']})")
    config = nbits.DefaultWeightOnlyQuantConfig(block_size=_BLOCK_SIZE, is_symmetric=True,
                                                accuracy_level=_ACCURACY_LEVEL, bits=4)
    quantizer = nbits.MatMulNBitsQuantizer(onnx.load(str(decoder)), algo_config=config)
    chatty = logging.getLogger(nbits.__name__)  # one INFO line per weight otherwise
    level = chatty.level
    chatty.setLevel(logging.WARNING)
    try:
        quantizer.process()
    finally:
        chatty.setLevel(level)
    quantized = sum(node.op_type == "MatMulNBits" for node in quantizer.model.model.graph.node)
    if not quantized:
        raise ValueError(f"{decoder}: no MatMul with a constant weight to quantise")
    staged = decoder.with_name("decoder.onnx.int4")
    quantizer.model.save_model_to_file(str(staged), False)
    staged.replace(decoder)
    record = {"scheme": scheme, "bits": 4, "block_size": _BLOCK_SIZE, "symmetric": True,
              "accuracy_level": _ACCURACY_LEVEL, "quantized_matmuls": quantized}
    manifest["decoder_weights"] = record
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    log.info("decoder weights quantised to %s (%d MatMuls) in %s", scheme, quantized, decoder)
    return record
