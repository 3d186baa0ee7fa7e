"""What a model's SHAPE costs per command on a CPU, apart from what its weights answer.

    source scripts/env.sh && python benchmarks/cpu_answer_cost.py --candidate DIR [--samples 6] [--threads 1]

Answer time = time to the first token (fit the frame, vision tower, prompt prefill with the node's
system-prompt prefix reuse) + new tokens x time per token. The first two depend on the
architecture only, so an untrained (or barely trained) checkpoint of a new recipe's shape tells,
before any GPU build, whether the trained model will keep the CPU latency budget. The third is read
off the recipe's own reference answers (--answers held-out samples, text only, tokenised by the
model's tokenizer, + the end-of-answer token). A short build's tokenizer was trained on little
text and splits words a full build keeps whole: its count is an upper bound.

Both the committed embedded model (models/, the baseline) and --candidate are measured in the same
run, interleaved, on the node's own backend (TransformersBackend with the node's engine options but
no per-frame vision cache; grammar off so the length is the one asked for): max_new_tokens 1 gives the time to the first token; 33 forced tokens give the time
per token. Prints both, the projected p50 answer time of each at its own reference answer length,
and candidate / baseline.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from cpu_latency import heldout_commands  # noqa: E402  (this folder: the same held-out frames)

FORCED_TOKENS = 33


def reference_answers(models: Path, count: int) -> list[str]:
    """The answers of the first ``count`` held-out English samples of a models folder (text only:
    enough of them that the mix of verbs is the generator's, whatever the split's seed)."""
    from training.heldout import read_heldout_spec
    from training.synth import Synthesizer

    cfg, indices = read_heldout_spec(models / "heldout" / "test_en.json")
    synth = Synthesizer(cfg, None)
    return [synth.sample(i, render=False).answer for i in indices[:count]]


class Shape:
    """One checkpoint on the node's backend with its held-out commands."""

    def __init__(self, name: str, models: Path, samples: int, threads: int, frame_size: tuple[int, int],
                 grammar: bool = False, answers: int = 200):
        from vla_node.backends.engine import EngineOptions
        from vla_node.backends.transformers_backend import TransformersBackend
        from vla_node.image import fit_to_limits
        from vla_node.manifest import prompt_template_of
        from vla_node.prompt import PromptBuilder
        from vla_node.vocabulary import Vocabulary

        self.name = name
        vocab = Vocabulary.load(None)
        self.prompt = PromptBuilder(vocab, template=prompt_template_of(models / "tabletop-tiny"))  # as the node does
        self.backend = TransformersBackend(str(models / "tabletop-tiny"), device="cpu", dtype="float32",
                                           vocab_fingerprint=vocab.fingerprint(), torch_threads=threads,
                                           # every call encodes its frame: the two calls per command see one
                                           engine=EngineOptions(frame_cache=0))
        if grammar:  # the node's default: only well-formed plans (its length is then the answer's own)
            from vla_node.policy import SafetyPolicy

            self.backend.enable_constrained_decoding(vocab, SafetyPolicy.from_config(vocab.policy_config or {}, vocab))
        tokenizer = self.backend.processor.tokenizer
        self.answer_tokens = [len(tokenizer(answer, add_special_tokens=False)["input_ids"]) + 1
                              for answer in reference_answers(models, answers)]
        self.commands = [(command, fit_to_limits(rgb, self.backend.pixel_limits)) for command, rgb in
                         heldout_commands(models / "heldout" / "test_en.json", samples, frame_size)]
        self.first_ms: list[float] = []
        self.per_token_ms: list[float] = []
        self.prompt_tokens = 0

    def run(self, command: str, rgb, max_new_tokens: int):
        from vla_node.backends.base import GenerationRequest

        started = time.perf_counter()
        result = self.backend.generate(GenerationRequest(image=rgb, messages=self.prompt.chat_messages(command),
                                                          max_new_tokens=max_new_tokens))
        return (time.perf_counter() - started) * 1000.0, result

    def measure(self, index: int) -> None:
        command, rgb = self.commands[index]
        first, result = self.run(command, rgb, 1)
        whole, forced = self.run(command, rgb, FORCED_TOKENS)
        self.prompt_tokens = result.prompt_tokens
        self.first_ms.append(first)
        if forced.new_tokens > 1:  # an early end-of-answer leaves too few tokens to time a step
            self.per_token_ms.append((whole - first) / (forced.new_tokens - 1))

    def projected_ms(self) -> float:
        return statistics.median(self.first_ms) + statistics.median(self.per_token_ms) * (
            statistics.median(self.answer_tokens) - 1)

    def report(self) -> list[str]:
        config = self.backend.model.config
        params = sum(p.numel() for p in self.backend.model.parameters())
        return [
            f"{self.name}: {params / 1e6:.1f}M parameters, text hidden {config.text_config.hidden_size} x "
            f"{config.text_config.num_hidden_layers} layers, prompt {self.prompt_tokens} tokens",
            f"  time to the first token   p50 {statistics.median(self.first_ms):8.1f} ms",
            f"  time per further token    p50 {statistics.median(self.per_token_ms):8.2f} ms "
            f"({len(self.per_token_ms)} commands with forced tokens)",
            f"  reference answer tokens   p50 {statistics.median(self.answer_tokens):8.0f} (incl. end of answer; "
            f"{len(self.answer_tokens)} held-out answers)",
            f"  projected answer time     p50 {self.projected_ms():8.1f} ms",
        ]


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--candidate", required=True, type=Path,
                        help="a models folder (tabletop-tiny/ + heldout/) of the recipe to judge, e.g. a short "
                             "`python -m training.build_embedded --base-steps 6 ... --out DIR` build")
    parser.add_argument("--baseline", type=Path, default=ROOT / "models", help="default: the committed models/")
    parser.add_argument("--samples", type=int, default=6, help="held-out commands (default %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default %(default)s)")
    parser.add_argument("--frame-size", default="640x480", help="camera frame WxH (default %(default)s)")
    parser.add_argument("--answers", type=int, default=200,
                        help="held-out reference answers whose token count sets the projected length (default %(default)s)")
    parser.add_argument("--grammar", action="store_true",
                        help="constrained decoding on, as in the node: answers end where the plan does, so the time "
                             "per token is read off each answer's own length")
    args = parser.parse_args(argv)
    frame_size = tuple(int(v) for v in args.frame_size.split("x"))
    torch.set_num_threads(args.threads)
    shapes = [Shape("baseline " + str(args.baseline), args.baseline, args.samples, args.threads, frame_size, args.grammar,
                    args.answers),
              Shape("candidate " + str(args.candidate), args.candidate, args.samples, args.threads, frame_size,
                    args.grammar, args.answers)]
    for shape in shapes:  # warm-up: first calls pay one-off allocation and the prefix cache fill
        shape.measure(0)
        shape.first_ms.clear()
        shape.per_token_ms.clear()
    for index in range(args.samples):
        for shape in shapes:
            shape.measure(index)
    print(f"device: {platform.machine()}, {os.cpu_count()} logical cores, torch threads {args.threads}, no GPU; "
          f"torch {torch.__version__}; frames {args.frame_size}, fp32, grammar {'on' if args.grammar else 'off'}, {args.samples} held-out commands")
    for shape in shapes:
        print("\n".join(shape.report()))
    baseline, candidate = shapes
    print(f"candidate / baseline: first token {statistics.median(candidate.first_ms) / statistics.median(baseline.first_ms):.2f}x, "
          f"per token {statistics.median(candidate.per_token_ms) / statistics.median(baseline.per_token_ms):.2f}x, "
          f"projected answer {candidate.projected_ms() / baseline.projected_ms():.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
