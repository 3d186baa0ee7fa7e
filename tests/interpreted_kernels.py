"""Runs vla_node/backends/engine/decode_kernels.py's Triton kernels on the CPU under Triton's interpreter
and prints what tests/test_decode_kernels.py checks, as one JSON object.

    TRITON_INTERPRET=1 python -m tests.interpreted_kernels MODEL_DIR

A separate process: the interpreter is chosen when the kernels are defined, so it must be set before
they are, and the other tests' processes keep compiled Triton.
"""
from __future__ import annotations

import json
import os
import sys


def matvec_errors() -> dict:
    """Largest difference from torch's linear, per candidate config and matrix shape (float32)."""
    import torch

    from vla_node.backends.engine import decode_kernels

    generator = torch.Generator().manual_seed(0)
    errors = {}
    for rows, inputs, with_bias in [(40, 96, True), (33, 1100, False)]:
        weight = torch.randn(rows, inputs, generator=generator)
        x = torch.randn(inputs, generator=generator)
        bias = torch.randn(rows, generator=generator) if with_bias else None
        expected = torch.nn.functional.linear(x.view(1, inputs), weight, bias).view(rows)
        for config in decode_kernels.MATVEC_CANDIDATES:
            out = torch.full((rows,), float("nan"))
            got = decode_kernels._launch_matvec(config, x, weight, bias, out)
            errors[f"{rows}x{inputs} {config}"] = float((got - expected).abs().max())
        shaped = decode_kernels.matvec(x.view(1, 1, inputs), weight, bias)
        errors[f"{rows}x{inputs} op shape"] = list(shaped.shape)
        errors[f"{rows}x{inputs} op"] = float((shaped.view(rows) - expected).abs().max())
    return errors


def attention_errors() -> dict:
    """Largest difference from SDPA over the key/value heads repeated per query head, with a mask
    that leaves gaps and slots beyond the keys (sliced off)."""
    import torch

    from vla_node.backends.engine import decode_kernels

    generator = torch.Generator().manual_seed(1)
    errors = {}
    for heads, kv_heads, slots, dim in [(16, 2, 300, 128), (12, 2, 130, 64), (4, 4, 70, 32)]:
        for dtype in (torch.float32, torch.bfloat16):
            query = torch.randn(1, heads, 1, dim, generator=generator).to(dtype)
            key, value = (torch.randn(1, kv_heads, slots, dim, generator=generator).to(dtype) for _ in range(2))
            mask = torch.zeros(1, 1, 1, slots + 5, dtype=torch.bool)
            mask[..., :slots // 2 + 3] = True
            mask[..., 7] = False
            out = decode_kernels.decode_attention(query, key, value, mask, dim ** -0.5)
            groups = heads // kv_heads
            expected = torch.nn.functional.scaled_dot_product_attention(
                query.float(), key.float().repeat_interleave(groups, 1), value.float().repeat_interleave(groups, 1),
                attn_mask=mask[..., :slots]).transpose(1, 2)
            errors[f"{heads}/{kv_heads} heads {slots} slots {str(dtype)[6:]}"] = (
                list(out.shape) == [1, 1, heads, dim] and out.dtype == dtype,
                float((out.float() - expected).abs().max()))
    return errors


def choices() -> dict:
    """(index, expected index, log-probability, expected) for scores with ties and masked blocks."""
    import torch

    from vla_node.backends.engine import decode_kernels

    generator = torch.Generator().manual_seed(2)
    out = {}
    for size in (151936, 5000, 3):
        scores = torch.randn(1, size, generator=generator) * 3
        if size > 4096:
            scores[0, :4096] = float("-inf")  # grammar-masked blocks
        top = float(scores.max()) + 1
        scores[0, size - 1] = top
        scores[0, size // 2 + 1] = top  # a tie: the first index wins, as in torch.argmax
        chosen, logprob = decode_kernels.greedy_choice(scores)
        expected = int(scores.argmax(dim=-1))
        out[str(size)] = (int(chosen), expected, float(logprob), float(torch.log_softmax(scores, -1)[0, expected]),
                          chosen.dtype == torch.long and logprob.dtype == torch.float32)
    return out


def graph_breaks() -> int:
    """Graph breaks torch.compile meets in a step that calls the three operators."""
    import torch

    from vla_node.backends.engine import decode_kernels
    from vla_node.backends.engine.static_decode import kernel_attention

    def step(x, weight, query, key, value, mask):
        attended, _ = kernel_attention(None, query, key, value, mask, 0.125)
        return decode_kernels.greedy_choice(decode_kernels.matvec(x, weight, None) + attended.sum())

    args = (torch.randn(1, 1, 16), torch.randn(64, 16), torch.randn(1, 4, 1, 32), torch.randn(1, 2, 40, 32),
            torch.randn(1, 2, 40, 32), torch.ones(1, 1, 1, 40, dtype=torch.bool))
    return int(torch._dynamo.explain(step)(*args).graph_break_count)


def decoding(model_dir: str) -> dict:
    """Answers of static decoding with the kernels (CPU, interpreted) and of transformers' generate loop."""
    from tests.fixtures_models import tiny_image, tiny_messages
    from vla_node.backends.engine import decode_kernels
    from vla_node.backends.base import GenerationRequest
    from vla_node.backends.engine import EngineOptions
    from vla_node.backends.transformers_backend import TransformersBackend

    calls = {"matvec": 0, "attention": 0, "choice": 0}

    def counted(name, function):
        def run(*args):
            calls[name] += 1
            return function(*args)
        return run

    # the kernels run for real; only the CUDA-only gate is opened, and the calls are counted
    decode_kernels._matvec_impl = counted("matvec", decode_kernels._matvec_impl)
    decode_kernels._attention_impl = counted("attention", decode_kernels._attention_impl)
    decode_kernels._choice_impl = counted("choice", decode_kernels._choice_impl)
    decode_kernels.available = lambda device: (decode_kernels.register(), True)[1]
    from vla_node.vocabulary import Vocabulary

    answers = {}
    for cache in ("static", "dynamic"):
        # the interpreter runs each attention program in Python: fewer slots; transformers' layers
        # around these kernels (test_layer_step.py: the fused layers)
        backend = TransformersBackend(model_dir, device="cpu", max_new_tokens=6, engine=EngineOptions(
            decode_cache=cache, static_cache_min_slots=256, layer_kernels=False))
        answers[cache] = []
        for constrained in (False, True):  # greedy, then under the action grammar
            if constrained:
                backend.enable_constrained_decoding(Vocabulary.load())
            result = backend.generate(GenerationRequest(
                image=tiny_image(168, 112), messages=tiny_messages("put the red cube in the blue bowl"),
                max_new_tokens=6))  # each interpreted launch costs ~0.1 s: few tokens
            answers[cache].append((result.text, result.new_tokens, result.confidence))
        if cache == "static":
            answers["kernels"] = backend.engine.decoder.kernels
        backend.close()
    answers["calls"] = calls
    return answers


def main(argv: list[str]) -> int:
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("set TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    from vla_node.backends.engine import decode_kernels

    decode_kernels.register()
    report = {"matvec": matvec_errors(), "attention": attention_errors(), "choice": choices(),
              "graph_breaks": graph_breaks(), "decoding": decoding(argv[0])}
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
