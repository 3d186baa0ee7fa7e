"""Grammar-constrained decoding (vla_node.grammar + TransformersBackend): only valid plans come out.

The proof: a RANDOM-weight tiny Qwen2.5-VL, sampling freely, gives 1,000 parse-valid plans that the
default SafetyPolicy accepts; without the grammar the same model gives text the parser refuses.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from vla_node.actions import ActionStep, Box, render_steps
from vla_node.grammar import (
    GrammarError,
    GrammarSpec,
    build_ebnf,
    integer_range_ebnf,
    worst_case_step_bytes,
)
from vla_node.parser import BoxCodec, ParseError, parse_actions
from vla_node.policy import SafetyPolicy
from vla_node.prompt import PromptBuilder
from vla_node.vocabulary import Vocabulary

xgr = pytest.importorskip("xgrammar")

VOCAB = Vocabulary.load()
POLICY = SafetyPolicy.from_config(VOCAB.policy_config, VOCAB)


def _matcher(ebnf: str):
    # Byte-level acceptance needs no real tokenizer: a one-token vocabulary will do.
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo(["<eos>", "a"]), max_threads=1)
    return xgr.GrammarMatcher(compiler.compile_grammar(ebnf), terminate_without_stop_token=True)


def accepts(ebnf: str, text: str) -> bool:
    """The whole text is a complete sentence of the grammar."""
    matcher = _matcher(ebnf)
    return matcher.accept_string(text) and matcher.is_completed()


def plan_problem(text: str, vocab: Vocabulary, policy: SafetyPolicy, image_size, model_size) -> str | None:
    """None when the text parses and the policy accepts it; otherwise why not."""
    try:
        steps = parse_actions(text, vocab, BoxCodec("absolute_resized", image_size, model_size))
    except ParseError as error:
        return f"parse: {error.reason}: {text!r}"
    refusal = policy.check(steps, image_size)
    return None if refusal is None else f"policy: {refusal}: {text!r}"


# ---- the grammar text ---------------------------------------------------------------------------
@pytest.mark.parametrize("largest", [0, 1, 9, 10, 55, 99, 100, 475, 1000])
def test_integer_range_is_exact(largest):
    ebnf = f"root ::= {integer_range_ebnf(largest)}\n"
    for value in range(0, largest + 1):
        assert accepts(ebnf, str(value)), value
    for text in (str(largest + 1), str(largest + 10), "00", "01", "-1", ""):
        assert not accepts(ebnf, text), text


def _spec(**kwargs) -> GrammarSpec:
    return GrammarSpec.from_vocabulary(VOCAB, POLICY, box_max=(99, 79), **kwargs)


def test_grammar_accepts_every_form_the_trainer_renders():
    ebnf = build_ebnf(_spec())
    steps = [
        ActionStep(verb="MOVE_OBJECT", object="red cube", destination="blue bowl",
                   object_box=Box(x_min=0, y_min=3, x_max=99, y_max=79)),
        ActionStep(verb="PICK_OBJECT", object="purple cylinder"),
        ActionStep(verb="PLACE_OBJECT", destination="white plate",
                   destination_box=Box(x_min=10, y_min=0, x_max=20, y_max=7)),
        ActionStep(verb="STOP"),
        ActionStep(verb="CLARIFY", reason="two red cubes are visible, which one?"),
    ]
    for step in steps:
        assert accepts(ebnf, render_steps([step], VOCAB)), step
    assert accepts(ebnf, render_steps(steps, VOCAB))
    # Chinese labels are what the parser maps to the allowlist: the grammar takes them too.
    assert accepts(ebnf, 'MOVE_OBJECT(object="红色方块", destination="蓝碗")')
    assert accepts(ebnf, 'CLARIFY(reason="桌子上没有红色方块。")')


@pytest.mark.parametrize(
    "text",
    [
        'MOVE_OBJECT(object="pink cube", destination="blue bowl")',  # not in the objects allowlist
        'MOVE_OBJECT(object="blue bowl", destination="red cube")',  # allowlists are per argument
        'THROW(object="red cube")',  # unknown verb
        'PICK_OBJECT(object="red cube", object_box=[100, 0, 1, 1])',  # x beyond the image
        'PICK_OBJECT(object="red cube", object_box=[1, 80, 1, 1])',  # y beyond the image
        'PICK_OBJECT(object="red cube", object_box=[01, 0, 1, 1])',  # leading zero
        'PICK_OBJECT(object="red cube", object_box=[1, 2, 3])',  # three numbers
        'CLARIFY(reason="")',  # empty reason is invalid for the parser
        'CLARIFY(reason=" why")',  # blank-led reason
        'CLARIFY(reason="a \\" quote")',  # escapes are never needed, so never generated
        "STOP()\n" * 8 + "STOP()",  # 9 steps > max_steps 8
        "STOP()\n",  # a trailing newline is an unfinished plan
        "Sure! STOP()",  # chatter
        'STOP() MOVE_OBJECT(object="red cube", destination="blue bowl")',  # two calls on one line
    ],
)
def test_grammar_refuses_what_parser_or_policy_would(text):
    assert not accepts(build_ebnf(_spec()), text)


def test_max_steps_and_reason_length_follow_the_settings():
    policy = SafetyPolicy.from_config({"max_steps": 2}, VOCAB)
    ebnf = build_ebnf(GrammarSpec.from_vocabulary(VOCAB, policy, reason_max_chars=5))
    assert accepts(ebnf, "STOP()\nSTOP()") and not accepts(ebnf, "STOP()\nSTOP()\nSTOP()")
    assert accepts(ebnf, 'CLARIFY(reason="abcde")') and not accepts(ebnf, 'CLARIFY(reason="abcdef")')
    # Without box bounds the grammar admits no boxes at all.
    assert not accepts(ebnf, 'PICK_OBJECT(object="red cube", object_box=[1, 1, 2, 2])')


def test_policy_allowlists_apply_only_when_asked():
    policy = SafetyPolicy.from_config(
        {"allowed_objects": ["red cube"], "allowed_verbs": ["PICK_OBJECT", "CLARIFY"]}, VOCAB
    )
    loose = build_ebnf(GrammarSpec.from_vocabulary(VOCAB, policy))
    strict = build_ebnf(GrammarSpec.from_vocabulary(VOCAB, policy, restrict_to_policy=True))
    blue = 'PICK_OBJECT(object="blue ball")'
    assert accepts(loose, blue) and not accepts(strict, blue)  # the policy refuses it visibly instead
    assert accepts(strict, 'PICK_OBJECT(object="red cube")') and accepts(strict, 'PICK_OBJECT(object="红方块")')
    assert not accepts(strict, "STOP()") and accepts(loose, "STOP()")
    assert not accepts(strict, 'PICK_OBJECT(object="红球")')  # a Chinese name of a refused label


def test_vocabulary_allowlist_and_free_labels():
    data = {
        "verbs": {"PICK_OBJECT": {"args": ["object"]}, "PLACE_OBJECT": {"args": ["destination"]}},
        "objects": ["red cube", "blue ball"],
        "destinations": "any",
        "labels_zh": {"红方块": "red cube"},
    }
    vocab = Vocabulary.from_dict(data)
    ebnf = build_ebnf(GrammarSpec.from_vocabulary(vocab))
    assert accepts(ebnf, 'PICK_OBJECT(object="红方块")') and not accepts(ebnf, 'PICK_OBJECT(object="green cube")')
    assert accepts(ebnf, 'PLACE_OBJECT(destination="Kitchen_Shelf 2")')  # "any": free names
    for blank in ('""', '" "', '"_"', '"-x"'):  # nothing the parser would call an empty label
        assert not accepts(ebnf, f"PLACE_OBJECT(destination={blank})")
    assert not accepts(ebnf, 'PLACE_OBJECT(destination="' + "x" * 101 + '")')  # MAX_LABEL_CHARS


def test_bad_settings_are_refused_with_a_reason():
    only_stop = SafetyPolicy.from_config({"allowed_verbs": []}, VOCAB)
    with pytest.raises(GrammarError, match="no verb"):
        GrammarSpec.from_vocabulary(VOCAB, only_stop, restrict_to_policy=True)
    with pytest.raises(GrammarError, match="reason_max_chars"):
        GrammarSpec.from_vocabulary(VOCAB, reason_max_chars=0)


def test_worst_case_step_bytes_bounds_every_rendered_step():
    spec = _spec(reason_max_chars=10)
    longest = 'MOVE_OBJECT(object="purple cylinder", object_box=[99, 79, 99, 79], destination="yellow plate", destination_box=[99, 79, 99, 79])'
    assert accepts(build_ebnf(spec), longest)
    assert worst_case_step_bytes(spec) >= len(longest.encode())
    assert worst_case_step_bytes(spec) - len(longest.encode()) < 10


# ---- with a random-weight tiny Qwen2.5-VL -------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # These models are tiny: on a shared 2-core machine one thread is several times faster.
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class GumbelSampling:
    """Exact sampling from softmax(scores) as argmax(scores + Gumbel noise): HF's greedy path
    then samples, far cheaper than its multinomial on a batch of 250. Masked (-inf) tokens stay out."""

    def __call__(self, input_ids, scores):
        import torch

        uniform = torch.rand_like(scores).clamp_(min=1e-12, max=1.0)
        return scores - torch.log(-torch.log(uniform))


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch.manual_seed(0)
    processor = AutoProcessor.from_pretrained(str(tiny_model_dir), local_files_only=True)
    processor.tokenizer.padding_side = "left"
    model = AutoModelForImageTextToText.from_pretrained(str(tiny_model_dir), local_files_only=True).eval()
    return processor, model


def _commands(count: int) -> list[str]:
    colours = ["red", "green", "blue", "yellow", "orange", "purple", "pink", "white"]
    shapes = ["cube", "ball", "cylinder", "cone", "bottle", "toy"]
    places = ["bowl", "tray", "box", "plate", "shelf"]
    zh = ["把红色方块放到蓝碗里", "拿起绿球", "停下", "把黄色圆锥放进白盒子", "那个东西"]
    out = []
    for i in range(count):
        c, s, p = colours[i % 8], shapes[(i // 8) % 6], places[(i // 48) % 5]
        kind = i % 5
        out.append(
            [f"put the {c} {s} in the {p}", f"pick up the {c} {s}", zh[i % 5] + f" {i}",
             f"move the {s} then stop {i}", "???" * (1 + i % 3)][kind]
        )
    return out


def _generate(processor, model, commands, grammar_processor, max_new_tokens, seed):
    import torch

    prompt = PromptBuilder(VOCAB, system_text="Turn the command into robot actions.")
    texts = [processor.apply_chat_template(prompt.chat_messages(c), add_generation_prompt=True, tokenize=False)
             for c in commands]
    images = [np.random.RandomState(seed + i).randint(0, 256, (56, 56, 3), dtype=np.uint8)
              for i in range(len(commands))]
    inputs = processor(text=texts, images=images, return_tensors="pt", padding=True)
    grid = inputs["image_grid_thw"][0].tolist()
    model_size = (int(grid[2]) * 14, int(grid[1]) * 14)
    eos = [processor.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    torch.manual_seed(seed)
    processors = ([grammar_processor(model_size)] if grammar_processor else []) + [GumbelSampling()]
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, logits_processor=processors,
                             eos_token_id=eos, pad_token_id=eos[-1])
    new = out[:, inputs["input_ids"].shape[1]:]
    texts = [processor.tokenizer.decode(row, skip_special_tokens=True) for row in new]
    return (texts, new.tolist(), eos), model_size


def test_1000_commands_random_model_constrained_all_valid(tiny):
    """The issue's proof: sampling (not greedy) walks the whole grammar, not one favourite answer."""
    from vla_node.grammar import ActionGrammar

    processor, model = tiny
    vocab_size = int(model.get_output_embeddings().weight.shape[0])
    eos = [processor.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    spec = GrammarSpec.from_vocabulary(VOCAB, POLICY, reason_max_chars=8)
    grammar = ActionGrammar(processor.tokenizer, vocab_size, eos, spec)
    image_size = (56, 56)
    commands = _commands(1000)
    verbs_seen, lines_seen, problems = set(), set(), []

    def make_processor(model_size):
        box_max = (model_size[0] - 1, model_size[1] - 1)
        processor_ = grammar.logits_processor(budget, box_max)
        assert processor_.strict  # the budget can hold a worst-case step: completion is guaranteed
        return processor_

    budget = worst_case_step_bytes(spec.with_box_max((55, 55))) + 1
    for start in range(0, len(commands), 250):
        batch = commands[start:start + 250]
        (texts, _, _), model_size = _generate(processor, model, batch, make_processor, budget, seed=start)
        for text in texts:
            problem = plan_problem(text, VOCAB, POLICY, image_size, model_size)
            if problem:
                problems.append(problem)
                continue
            steps = parse_actions(text, VOCAB, BoxCodec("absolute_resized", image_size, model_size))
            verbs_seen.update(s.verb for s in steps)
            lines_seen.add(len(steps))
    assert problems == [], f"{len(problems)} of 1000 invalid, first: {problems[:3]}"
    assert verbs_seen == set(VOCAB.verbs)  # the random walk did reach every verb
    assert grammar.compile_count == 1 and grammar.matchers_created == 1000


def test_same_random_model_unconstrained_is_invalid(tiny):
    """Proves the checker above can fail: without the grammar the random model's text is refused."""
    processor, model = tiny
    (texts, _, _), model_size = _generate(processor, model, _commands(16), None, 24, seed=7)
    problems = [plan_problem(t, VOCAB, POLICY, (56, 56), model_size) for t in texts]
    assert all(p is not None for p in problems), [t for t, p in zip(texts, problems) if p is None]


def test_budget_too_small_for_a_guarantee_still_stops_between_steps(tiny):
    """max_new_tokens below a worst-case step: no guarantee, but a second step is only started
    when the longest step so far still fits, so most plans end cleanly (and none has junk after)."""
    from vla_node.grammar import ActionGrammar

    processor, model = tiny
    vocab_size = int(model.get_output_embeddings().weight.shape[0])
    eos = [processor.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    grammar = ActionGrammar(processor.tokenizer, vocab_size, eos, GrammarSpec.from_vocabulary(VOCAB, POLICY))
    made = []

    def make_processor(model_size):
        made.append(grammar.logits_processor(48, (model_size[0] - 1, model_size[1] - 1)))
        return made[-1]

    (texts, rows, eos), model_size = _generate(processor, model, _commands(32), make_processor, 48, seed=3)
    assert not made[0].strict
    compiled = grammar.compiled((model_size[0] - 1, model_size[1] - 1))
    finished = 0
    for text, row in zip(texts, rows):  # every token is inside the grammar, up to the stop token
        matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=eos)
        for token in row:
            assert matcher.accept_token(token), text
            if matcher.is_terminated():
                finished += 1
                break
    # Most plans end with a stop token inside 48 tokens (the random model's steps are long).
    assert finished >= len(rows) // 2, finished


# ---- the backend and the factory ----------------------------------------------------------------
def test_backend_compiles_once_and_uses_fresh_matchers(tiny_model_dir):
    from vla_node.factory import RuntimeSettings, build_core

    core = build_core(RuntimeSettings(model_path=str(tiny_model_dir), device="cpu", max_new_tokens=160))
    grammar = core.backend.action_grammar
    assert grammar is not None  # on by default
    image = np.random.RandomState(0).randint(0, 256, (120, 160, 3), dtype=np.uint8)
    for command in ("put the red cube in the blue bowl", "把绿球放到白盘子里", "do something"):
        plan, status = core.infer(image, command)
        assert status.code.value == "ACCEPTED", status.detail
        assert plan.steps and plan.raw_text.count("\n") < POLICY.max_steps
    assert grammar.compile_count == 1 and grammar.cache_hits == 2 and grammar.matchers_created == 3
    core.infer(np.zeros((60, 200, 3), dtype=np.uint8), "pick up the red cube")  # other image size
    assert grammar.compile_count == 2 and grammar.matchers_created == 4

    off = build_core(RuntimeSettings(model_path=str(tiny_model_dir), device="cpu", max_new_tokens=16,
                                     constrained_decoding=False), backend=None)
    assert off.backend.action_grammar is None
    plan, status = off.infer(image, "put the red cube in the blue bowl")
    assert status.code.value == "PARSE_ERROR", status.detail  # the same random model, unconstrained


def test_backend_refuses_a_grammar_that_admits_nothing(tiny_model_dir):
    from vla_node.backends.base import BackendError
    from vla_node.backends.transformers_backend import TransformersBackend

    backend = TransformersBackend(tiny_model_dir, device="cpu", max_new_tokens=8)
    no_verbs = SafetyPolicy.from_config({"allowed_verbs": []}, VOCAB)
    with pytest.raises(BackendError, match="constrained decoding: no verb"):
        backend.enable_constrained_decoding(VOCAB, no_verbs, restrict_to_policy=True)
    assert backend.action_grammar is None


def test_embedded_model_with_constrained_decoding():
    from vla_node.backends.base import BackendError
    from vla_node.factory import EMBEDDED_MODEL, RuntimeSettings, build_core, embedded_path

    try:
        embedded_path(EMBEDDED_MODEL)
    except BackendError:
        pytest.skip("embedded model models/tabletop-tiny is not built")
    core = build_core(RuntimeSettings(device="cpu"))
    assert core.backend.action_grammar is not None
    image = np.full((240, 320, 3), 200, dtype=np.uint8)
    image[100:140, 60:100] = (220, 30, 30)
    for command in ("put the red cube in the blue bowl", "把红色方块放到蓝碗里"):
        plan, status = core.infer(image, command)
        assert status.code.value == "ACCEPTED", status.detail
        json.dumps(plan.model_dump())  # a complete, serialisable plan


def test_allowed_tokens_unpacks_a_bitmask_as_xgrammar_applies_it():
    """The numpy view of a bitmask (the onnx backend masks numpy scores with it) allows exactly the
    tokens xgrammar's own apply_token_bitmask_inplace leaves finite, bit 31 of each word included."""
    import numpy as np
    import torch
    import xgrammar as xgr

    from vla_node.grammar import allowed_tokens

    vocab_size = 101  # not a multiple of 32: the last word is partly outside the vocabulary
    generator = torch.Generator().manual_seed(0)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (1, 4), dtype=torch.int32, generator=generator)
    bitmask[0, 1] = -1  # every bit set, bit 31 too
    scores = torch.zeros(1, vocab_size)
    xgr.apply_token_bitmask_inplace(scores, bitmask, vocab_size=vocab_size)
    allowed = allowed_tokens(bitmask.numpy(), vocab_size)
    assert allowed.shape == (vocab_size,) and allowed.dtype == np.bool_
    np.testing.assert_array_equal(allowed, torch.isfinite(scores[0]).numpy())
    assert allowed[32:64].all()


def test_box_bounds_stay_one_below_the_image_edge():
    from vla_node.grammar import box_bounds

    assert box_bounds("normalized_1000", (640, 480)) == (999, 999)
    assert box_bounds("absolute_resized", (644, 476)) == (643, 475)
    assert box_bounds("absolute_resized", (1, 1)) == (1, 1)
