"""Cost of grammar-constrained decoding per generated token, embedded model, CPU.

    source scripts/env.sh && python benchmarks/grammar_cost.py [--commands 12] [--repeats 3] [--threads 0]  # results: benchmarks/results/grammar_cost_cpu.txt

Same run, same backend, same commands, constrained and unconstrained generations interleaved (so
machine load hits both alike). Reports:
  * one-time costs: indexing the tokenizer (enable_constrained_decoding) and compiling the grammar
    for one image size (first request; later requests of that size hit the cache);
  * per generated token: whole generate() time / new tokens, both modes, and their ratio;
  * the grammar's own share: time inside the logits processor (matcher accept + bitmask fill +
    masking) per token, measured directly.
Greedy decoding, like the node. The two modes generate different texts, so the per-token numbers
are the fair comparison, not the per-command ones.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

COMMANDS = [
    "put the red cube in the blue bowl",
    "pick up the green ball",
    "place it on the white plate",
    "move the yellow cone to the red tray",
    "把红色方块放到蓝碗里",
    "拿起紫色圆柱",
    "put the orange ball in the green box and then pick up the blue cube",
    "move the purple cone onto the yellow plate",
    "is there a pink cup",
    "把黄球放进白盒子",
    "pick the blue cylinder",
    "put the green cube in the white tray",
]


def scene(seed: int) -> np.ndarray:
    rng = np.random.RandomState(seed)
    image = np.full((240, 320, 3), 200, dtype=np.uint8)
    for _ in range(3):
        x, y = rng.randint(0, 280), rng.randint(0, 200)
        image[y:y + 40, x:x + 40] = rng.randint(0, 256, 3)
    return image


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commands", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = parser.parse_args(argv)

    import torch
    import transformers
    import xgrammar

    from vla_node import grammar as grammar_module
    from vla_node.backends.base import GenerationRequest
    from vla_node.factory import EMBEDDED_MODEL, embedded_path
    from vla_node.backends.transformers_backend import TransformersBackend
    from vla_node.image import fit_to_limits
    from vla_node.policy import SafetyPolicy
    from vla_node.prompt import PromptBuilder
    from vla_node.vocabulary import Vocabulary

    if args.threads:
        torch.set_num_threads(args.threads)
    vocab = Vocabulary.load()
    policy = SafetyPolicy.from_config(vocab.policy_config, vocab)
    prompt = PromptBuilder(vocab)
    backend = TransformersBackend(embedded_path(EMBEDDED_MODEL), device="cpu", max_new_tokens=args.max_new_tokens)
    backend.warmup()

    started = time.perf_counter()
    backend.enable_constrained_decoding(vocab, policy)
    enable_ms = (time.perf_counter() - started) * 1000
    grammar = backend.action_grammar

    # Time spent inside the grammar's logits processor, per call (= per generated token).
    processor_s: list[float] = []
    original_call = grammar_module.GrammarLogitsProcessor.__call__

    def timed_call(self, input_ids, scores):
        t0 = time.perf_counter()
        try:
            return original_call(self, input_ids, scores)
        finally:
            processor_s.append(time.perf_counter() - t0)

    grammar_module.GrammarLogitsProcessor.__call__ = timed_call

    requests = []
    for i in range(args.commands):
        image = fit_to_limits(scene(i), backend.pixel_limits)
        messages = prompt.chat_messages(COMMANDS[i % len(COMMANDS)])
        requests.append(GenerationRequest(image=image, messages=messages, max_new_tokens=args.max_new_tokens))

    # The first request of an image size compiles its grammar (box bounds); time that alone.
    inputs = backend.prepare_inputs(requests[0].image, requests[0].messages)
    grid = inputs["image_grid_thw"][0].tolist()
    model_size = (int(grid[2]) * backend.patch_size, int(grid[1]) * backend.patch_size)
    started = time.perf_counter()
    grammar.compiled(backend._box_bounds(model_size))
    compile_ms = (time.perf_counter() - started) * 1000

    totals = {"unconstrained": [0.0, 0], "constrained": [0.0, 0]}
    per_command = {"unconstrained": [], "constrained": []}
    processor_s.clear()
    for _ in range(args.repeats):
        for request in requests:
            for mode in ("unconstrained", "constrained"):
                backend.action_grammar = grammar if mode == "constrained" else None
                result = backend.generate(request)
                totals[mode][0] += result.generate_ms
                totals[mode][1] += result.new_tokens
                per_command[mode].append(result.new_tokens)
    backend.action_grammar = grammar
    grammar_module.GrammarLogitsProcessor.__call__ = original_call

    ms_per_token = {mode: ms / max(tokens, 1) for mode, (ms, tokens) in totals.items()}
    processor_ms_per_token = 1000 * sum(processor_s) / max(len(processor_s), 1)
    print(f"# python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"xgrammar {getattr(xgrammar, '__version__', None) or _dist_version('xgrammar')}, "
          f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs, {platform.machine()}")
    print(f"embedded model {backend.model_id}, vocab size {grammar.vocab_size}, "
          f"{args.commands} commands x {args.repeats} repeats, greedy, max_new_tokens {args.max_new_tokens}")
    print(f"one-time: index tokenizer + check grammar (enable)       {enable_ms:8.1f} ms")
    print(f"one-time: compile the grammar for one image size          {compile_ms:8.1f} ms "
          f"(model input {model_size[0]}x{model_size[1]}; later requests of that size hit the cache)")
    for mode in ("unconstrained", "constrained"):
        ms, tokens = totals[mode]
        print(f"{mode:>13}: {tokens:5d} tokens, {ms:9.1f} ms, {ms_per_token[mode]:7.3f} ms/token, "
              f"tokens/command median {statistics.median(per_command[mode]):.0f}")
    ratio = ms_per_token["constrained"] / ms_per_token["unconstrained"]
    print(f"per-token ratio constrained / unconstrained                 {ratio:7.3f}x")
    print(f"grammar logits processor alone                            {processor_ms_per_token:7.3f} ms/token "
          f"({100 * processor_ms_per_token / ms_per_token['constrained']:.1f}% of a constrained token)")
    print(f"grammar cache: {grammar.compile_count} compiled, {grammar.cache_hits} hits, "
          f"{grammar.matchers_created} matchers (one per constrained request)")
    return 0


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    raise SystemExit(main())
