"""Runs layer_step.py's fused decode layers on the CPU under Triton's interpreter against
transformers' layers, and prints what tests/test_layer_step.py checks, as one JSON object.

    TRITON_INTERPRET=1 python -m tests.interpreted_layer_step NAME=MODEL_DIR[,ADAPTER_DIR] ...

A separate process: the interpreter is chosen when the kernels are defined (see
tests/interpreted_kernels.py).
"""
from __future__ import annotations

import json
import os
import sys


def decode_both_ways(model_dir: str, adapter_dir: str | None = None) -> dict:
    """Per way (fused layers or transformers' layers around the Triton kernels), with the LoRA
    adapter ``adapter_dir`` active if given: the answers to two commands (greedy, then under the
    action grammar), and the cache after them: each layer's fill and the keys/values up to it."""
    import torch

    from tests.fixtures_models import tiny_image, tiny_messages
    from vla_node.backends.engine import decode_kernels
    from vla_node.backends.base import GenerationRequest
    from vla_node.backends.engine import EngineOptions
    from vla_node.backends.transformers_backend import TransformersBackend
    from vla_node.vocabulary import Vocabulary

    decode_kernels.available = lambda device: (decode_kernels.register(), True)[1]  # only the CUDA gate opened
    ways, caches = {}, {}
    for layer_step in (True, False):
        # the interpreter runs each attention program in Python: few slots
        backend = TransformersBackend(model_dir, device="cpu", max_new_tokens=4, adapter_path=adapter_dir,
                                      engine=EngineOptions(decode_cache="static", static_cache_min_slots=256,
                                                           layer_kernels=layer_step))
        answers = []
        for constrained, command in ((False, "put the red cube in the blue bowl"), (True, "pick up the green ball")):
            if constrained:
                backend.enable_constrained_decoding(Vocabulary.load())
            result = backend.generate(GenerationRequest(image=tiny_image(168, 112, seed=len(answers)),
                                                        messages=tiny_messages(command), max_new_tokens=4))
            answers.append((result.text, result.new_tokens, result.confidence))
        decoder = backend.engine.decoder
        layers = backend.engine.static_cache.layers
        fills = [int(layer.cumulative_length) for layer in layers]
        caches[layer_step] = [(layer.keys[:, :, :fill].clone(), layer.values[:, :, :fill].clone())
                              for layer, fill in zip(layers, fills)]
        ways["fused" if layer_step else "transformers"] = {
            "answers": answers, "fills": fills, "layer_step": decoder.layer_step,
            "configs": {name: list(config) for name, config in
                        (decoder._layer_step.configs.items() if decoder.layer_step else ())}}
        backend.close()
    ways["cache_difference"] = max(float(torch.max((a - b).abs())) for pair_a, pair_b in zip(caches[True], caches[False])
                                   for a, b in zip(pair_a, pair_b))
    return ways


def main(argv: list[str]) -> int:
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("set TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    report = {}
    for pair in argv:
        name, dirs = pair.split("=", 1)
        report[name] = decode_both_ways(*dirs.split(","))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
