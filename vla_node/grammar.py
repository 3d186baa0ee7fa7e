"""Grammar-constrained decoding: only well-formed action plans can be generated.

The grammar (xgrammar EBNF) is generated from the action vocabulary and speaks the canonical call
syntax of vla_node.actions, one step per line, at most `max_steps` lines, then a stop token:

    MOVE_OBJECT(object="red cube", object_box=[12, 40, 88, 120], destination="blue bowl")
    CLARIFY(reason="two red cubes are visible")

Labels are the allowlisted ones (canonical English and the Chinese names that map to them), or any
short name when the vocabulary says "any"; box coordinates are integers inside the image the model
saw, so every box the parser converts lies inside the camera image. Optionally the policy's own
allowlists (allowed_verbs / allowed_objects / allowed_destinations) narrow the grammar further.

Note: the grammar ends a plan after max_steps lines, so a model that wants a longer plan gets its
first max_steps steps (and the safety gate's max_steps rule can no longer fire) instead of a refusal.

Cost model: the xgrammar TokenizerInfo and GrammarCompiler are built once per tokenizer, a grammar
is compiled once per (vocabulary, allowlists, box bounds) and cached; each request gets a fresh
GrammarMatcher per batch row (matchers are stateful and cannot be shared).

Token budget: a plan must end before max_new_tokens or it is cut mid-call. The logits processor
therefore starts another step only while the remaining budget can hold one more step plus the stop
token. When max_new_tokens can hold a worst-case step (every token at least one byte), this is a
guarantee: generation always ends with a complete plan. Otherwise the longest step generated so
far is the estimate (a good one in practice, not a guarantee).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from vla_node.actions import BOX_SUFFIX
from vla_node.lru import CountingLru, LruBacked
from vla_node.policy import SafetyPolicy
from vla_node.vocabulary import MAX_LABEL_CHARS, Vocabulary

__all__ = [
    "ActionGrammar",
    "GrammarError",
    "GrammarLogitsProcessor",
    "GrammarSpec",
    "allowed_tokens",
    "box_bounds",
    "build_ebnf",
    "check_ebnf",
    "worst_case_step_bytes",
]

# Free-text arguments (CLARIFY's reason) are capped so a runaway model cannot fill the budget.
DEFAULT_REASON_MAX_CHARS = 120
# Free labels ("objects: any"): NFKC-stable letters only, so normalisation never grows or empties
# them: ASCII letters/digits, Latin-1 letters, CJK ideographs; separators only after the first char.
_LABEL_CORE = r"[a-zA-Z0-9\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u00ff\u4e00-\u9fff]"
_LABEL_SEPARATOR = r"[ _\-]"
# Reason text: printable ASCII except quote and backslash (no escapes needed), CJK ideographs and
# CJK / full-width punctuation. The first character is not a space: a blank reason is invalid.
_REASON_FIRST = r"[!#-\[\]-~\u4e00-\u9fff\u3001-\u303f\uff01-\uff5e]"
_REASON_CHAR = r"[ !#-\[\]-~\u4e00-\u9fff\u3001-\u303f\uff01-\uff5e]"
_MAX_BYTES_PER_CHAR = 3  # the widest character any class above admits, in UTF-8


class GrammarError(ValueError):
    """The grammar cannot be built (bad settings, or xgrammar rejects it); the message says why."""


@dataclass(frozen=True)
class GrammarSpec:
    """Everything the grammar text depends on; hashable, so it keys the compiled-grammar cache."""

    verbs: tuple[tuple[str, tuple[str, ...]], ...]  # (verb, args in canonical order)
    label_args: tuple[str, ...]
    labels: tuple[tuple[str, tuple[str, ...] | None], ...]  # arg -> allowed strings, None = free label
    max_steps: int
    box_max: tuple[int, int] | None  # largest x and y coordinate; None = boxes not allowed
    reason_max_chars: int = DEFAULT_REASON_MAX_CHARS

    @classmethod
    def from_vocabulary(
        cls,
        vocab: Vocabulary,
        policy: SafetyPolicy | None = None,
        restrict_to_policy: bool = False,
        box_max: tuple[int, int] | None = None,
        reason_max_chars: int = DEFAULT_REASON_MAX_CHARS,
    ) -> "GrammarSpec":
        """The vocabulary's verbs and allowlists; max_steps from the policy (8 without one).

        restrict_to_policy also applies the policy's allowed_verbs / allowed_objects /
        allowed_destinations. Off by default: a command naming a refused object then gets a visible
        REJECTED_BY_POLICY instead of the model being steered to some other, allowed object.
        """
        policy = policy or SafetyPolicy()
        if reason_max_chars < 1:
            raise GrammarError(f"reason_max_chars must be >= 1, got {reason_max_chars}")
        if box_max is not None and (min(box_max) < 1):
            raise GrammarError(f"box_max must be positive (x, y), got {box_max}")
        verbs = [(name, spec.args) for name, spec in vocab.verbs.items()]
        policy_labels = {"object": policy.allowed_objects, "destination": policy.allowed_destinations}
        if restrict_to_policy and policy.allowed_verbs is not None:
            verbs = [(name, args) for name, args in verbs if name in policy.allowed_verbs]
        if not verbs:
            raise GrammarError("no verb is allowed: the grammar would admit no plan")
        labels = []
        for arg in vocab.label_args:
            allowed = vocab.allowlist_for(arg)
            narrower = policy_labels.get(arg) if restrict_to_policy else None
            if narrower is not None:
                allowed = narrower if allowed is None else allowed & narrower
            if allowed is None:
                labels.append((arg, None))
                continue
            # Chinese names the parser maps onto an allowed label are valid output too.
            chinese = [zh for zh, target in vocab.labels_zh.items() if target in allowed]
            choices = tuple(sorted(set(allowed) | set(chinese)))
            if not choices:
                raise GrammarError(f"no label is allowed for '{arg}'")
            labels.append((arg, choices))
        return cls(
            verbs=tuple(verbs),
            label_args=tuple(vocab.label_args),
            labels=tuple(labels),
            max_steps=int(policy.max_steps),
            box_max=None if box_max is None else (int(box_max[0]), int(box_max[1])),
            reason_max_chars=int(reason_max_chars),
        )

    def with_box_max(self, box_max: tuple[int, int] | None) -> "GrammarSpec":
        from dataclasses import replace

        return replace(self, box_max=None if box_max is None else (int(box_max[0]), int(box_max[1])))


# ---- grammar text -------------------------------------------------------------------------------
def _literal(text: str) -> str:
    """An EBNF string literal (xgrammar reads C-style escapes)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _rule_name(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text.lower())


def integer_range_ebnf(largest: int) -> str:
    """Alternatives matching the integers 0..largest written without leading zeros."""
    if largest < 0:
        raise GrammarError(f"integer range needs largest >= 0, got {largest}")
    digits = str(largest)
    alternatives = ['"0"']
    for length in range(1, len(digits)):  # every number with fewer digits than `largest`
        alternatives.append(" ".join(["[1-9]"] + ["[0-9]"] * (length - 1)))
    for i, digit in enumerate(digits):  # same length: a smaller digit at position i, anything after
        low, high = (1 if i == 0 else 0), int(digit) - 1
        if high >= low:
            prefix = [_literal(digits[:i])] if i else []
            alternatives.append(" ".join(prefix + [f"[{low}-{high}]"] + ["[0-9]"] * (len(digits) - i - 1)))
    if largest > 0:
        alternatives.append(_literal(digits))
    return " | ".join(f"({alt})" for alt in alternatives)


def build_ebnf(spec: GrammarSpec) -> str:
    """The xgrammar EBNF of a plan: 1..max_steps canonical calls, one per line."""
    rules = [
        f"root ::= step ({_literal(chr(10))} step){{0,{spec.max_steps - 1}}}"
        if spec.max_steps > 1
        else "root ::= step",
        "step ::= " + " | ".join(f"verb_{_rule_name(name)}" for name, _ in spec.verbs),
    ]
    labels = dict(spec.labels)
    for name, args in spec.verbs:
        parts = []
        for arg in args:
            part = f"{_literal(arg + '=')} value_{arg}"
            if arg in spec.label_args and spec.box_max is not None:
                part += f" ({_literal(', ' + arg + BOX_SUFFIX + '=')} box)?"
            parts.append(part)
        body = f" {_literal(', ')} ".join(parts)
        rules.append(f"verb_{_rule_name(name)} ::= {_literal(name + '(')} {body} {_literal(')')}".replace("  ", " "))
    used_args = sorted({arg for _, args in spec.verbs for arg in args})
    for arg in used_args:
        if arg in spec.label_args:
            choices = labels.get(arg)
            if choices is None:
                rules.append(
                    f'value_{arg} ::= "\\"" {_LABEL_CORE} ({_LABEL_CORE} | {_LABEL_SEPARATOR}){{0,{MAX_LABEL_CHARS - 1}}} "\\""'
                )
            else:
                rules.append(f"value_{arg} ::= " + " | ".join(_literal(f'"{c}"') for c in choices))
        else:
            rules.append(
                f'value_{arg} ::= "\\"" {_REASON_FIRST} {_REASON_CHAR}{{0,{spec.reason_max_chars - 1}}} "\\""'
            )
    if spec.box_max is not None:
        x_max, y_max = spec.box_max
        rules.append('box ::= "[" box_x ", " box_y ", " box_x ", " box_y "]"')
        rules.append(f"box_x ::= {integer_range_ebnf(x_max)}")
        rules.append(f"box_y ::= {integer_range_ebnf(y_max)}")
    return "\n".join(rules) + "\n"


def worst_case_step_bytes(spec: GrammarSpec) -> int:
    """UTF-8 length of the longest step the grammar admits (an upper bound on its token count)."""
    labels = dict(spec.labels)

    def label_bytes(arg: str) -> int:
        choices = labels.get(arg)
        if choices is None:
            return MAX_LABEL_CHARS * _MAX_BYTES_PER_CHAR + 2
        return max(len(c.encode("utf-8")) for c in choices) + 2

    longest = 0
    for name, args in spec.verbs:
        size = len(name) + 2 + 2 * max(len(args) - 1, 0)  # "NAME(" ")" and ", " between args
        for arg in args:
            size += len(arg) + 1
            if arg in spec.label_args:
                size += label_bytes(arg)
                if spec.box_max is not None:
                    width = len(str(spec.box_max[0])) * 2 + len(str(spec.box_max[1])) * 2
                    size += len(f", {arg}{BOX_SUFFIX}=[") + width + 3 * 2 + 1
            else:
                size += spec.reason_max_chars * _MAX_BYTES_PER_CHAR + 2
        longest = max(longest, size)
    return longest


# ---- compiling and decoding ---------------------------------------------------------------------
class ActionGrammar(LruBacked):
    """One per (tokenizer, vocabulary, allowlists): compiles lazily per box bound, caches the result.

    `logits_processor(...)` gives a fresh processor (fresh matchers) for every generate() call.
    """

    @classmethod
    def for_vocabulary(cls, tokenizer, vocab_size: int, stop_token_ids, vocab: Vocabulary,
                       policy: SafetyPolicy | None = None, restrict_to_policy: bool = False,
                       reason_max_chars: int | None = None) -> "ActionGrammar":
        """The grammar of ``vocab`` (narrowed to the policy's allowlists if ``restrict_to_policy``),
        checked once; what a backend's ``enable_constrained_decoding`` builds. Raises GrammarError."""
        options = {} if reason_max_chars is None else {"reason_max_chars": reason_max_chars}
        spec = GrammarSpec.from_vocabulary(vocab, policy, restrict_to_policy, **options)
        check_ebnf(build_ebnf(spec.with_box_max((999, 999))))
        return cls(tokenizer, vocab_size, list(stop_token_ids), spec)

    def __init__(
        self,
        tokenizer,
        vocab_size: int,
        stop_token_ids: list[int],
        spec: GrammarSpec,
        cache_size: int = 16,
    ):
        import xgrammar as xgr

        if not stop_token_ids:
            raise GrammarError("constrained decoding needs at least one stop token id")
        self.spec = spec
        self.stop_token_ids = [int(i) for i in stop_token_ids]
        self.vocab_size = int(vocab_size)
        try:
            self.tokenizer_info = xgr.TokenizerInfo.from_huggingface(
                tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.stop_token_ids
            )
        except Exception as error:
            raise GrammarError(f"xgrammar cannot read the tokenizer: {error}") from error
        # One compiler thread: the machine's cores belong to the model.
        self._compiler = xgr.GrammarCompiler(self.tokenizer_info, max_threads=1)
        self._lru = CountingLru(int(cache_size))  # GrammarSpec -> compiled grammar
        self._lock = threading.Lock()
        self.matchers_created = 0

    # the compiled-grammar cache's counters, under the names diagnostics and tests read
    compile_count = LruBacked.misses  # grammars actually compiled
    cache_hits = LruBacked.hits

    def compiled(self, box_max: tuple[int, int] | None = None):
        """The compiled grammar for these box bounds (compiled on first use, then cached)."""
        spec = self.spec.with_box_max(box_max)

        def compile_spec():
            try:
                with self._lock:  # one compile at a time on the shared compiler
                    return self._compiler.compile_grammar(build_ebnf(spec))
            except Exception as error:
                raise GrammarError(f"xgrammar cannot compile the action grammar: {error}") from error

        return self._lru.get_or_make(spec, compile_spec)

    def logits_processor(self, max_new_tokens: int, box_max: tuple[int, int] | None = None) -> "GrammarLogitsProcessor":
        spec = self.spec.with_box_max(box_max)
        return GrammarLogitsProcessor(self, self.compiled(box_max), max_new_tokens, worst_case_step_bytes(spec))

    def batch_logits_processor(
        self, budgets: list[int], box_maxes: list[tuple[int, int] | None]
    ) -> "GrammarLogitsProcessor":
        """One processor for a batch whose rows differ in image size (box bounds) and token budget."""
        rows = [(self.compiled(box_max), int(budget), worst_case_step_bytes(self.spec.with_box_max(box_max)))
                for budget, box_max in zip(budgets, box_maxes, strict=True)]
        return GrammarLogitsProcessor(self, rows[0][0], max(r[1] for r in rows), max(r[2] for r in rows), rows=rows)

    def _new_matcher(self, compiled):
        import xgrammar as xgr

        with self._lock:
            self.matchers_created += 1
        return xgr.GrammarMatcher(compiled, override_stop_tokens=self.stop_token_ids)


class GrammarLogitsProcessor:
    """A transformers LogitsProcessor (call signature input_ids, scores -> scores); one per generate().

    Works for any batch size: one matcher per row, created on the first call; batches use
    xgrammar's batch calls so the per-token cost does not grow with Python loops over rows.
    """

    def __init__(self, grammar: ActionGrammar, compiled, max_new_tokens: int, worst_step_tokens: int,
                 rows: list[tuple[object, int, int]] | None = None):
        self._grammar = grammar
        # Per row (compiled grammar, token budget, worst step) for a batch of different requests;
        # None: every row shares the arguments above.
        self._rows = rows
        # Rows the caller ended early (stop event, own budget): generate() pads them from then on,
        # so their matchers must neither see those pads nor constrain them.
        self.released: set[int] = set()
        self._compiled = compiled
        self.max_new_tokens = int(max_new_tokens)
        # A step may start only if newline + a step + the stop token still fit. Strict: worst case.
        self.strict = self.max_new_tokens >= worst_step_tokens + 1
        self._worst_step = worst_step_tokens
        self.matchers: list = []
        self._bitmask = None
        self._batch_matcher = None
        self._calls = 0
        self._step_start: list[int] = []  # per row: token index where the current step began
        self._longest_step: list[int] = []

    def _start(self, batch: int) -> None:
        import torch
        import xgrammar as xgr

        rows = self._rows or [(self._compiled, self.max_new_tokens, self._worst_step)] * batch
        if len(rows) != batch:
            raise GrammarError(f"processor made for {len(rows)} rows got a batch of {batch}")
        self.matchers = [self._grammar._new_matcher(compiled) for compiled, _, _ in rows]
        self._row_budget = [budget for _, budget, _ in rows]
        self._row_worst = [worst for _, _, worst in rows]
        self._row_strict = [budget >= worst + 1 for _, budget, worst in rows]
        self._bitmask = xgr.allocate_token_bitmask(batch, self._grammar.vocab_size)
        if batch > 1:
            self._batch_matcher = xgr.BatchGrammarMatcher(max_threads=1)
        self._step_start = [0] * batch
        self._longest_step = [0] * batch
        stops = torch.tensor(self._grammar.stop_token_ids, dtype=torch.int64)
        self._stop_words = stops // 32
        self._stop_shifts = (stops % 32).to(torch.int32)
        only_stops = torch.zeros(self._bitmask.shape[1], dtype=torch.int64)
        for token in self._grammar.stop_token_ids:
            only_stops[token // 32] |= 1 << (token % 32)
        self._only_stops = only_stops.to(torch.int32)  # same bits, int32 wrap-around as xgrammar's

    def __call__(self, input_ids, scores):
        import xgrammar as xgr

        bitmask = self.next_bitmask(input_ids)
        device = scores.device
        work = scores if device.type in ("cpu", "cuda") else scores.to("cpu")
        xgr.apply_token_bitmask_inplace(work, bitmask.to(work.device), vocab_size=self._grammar.vocab_size)
        return work if work is scores else work.to(device)

    def next_bitmask(self, input_ids):
        """The grammar after each row's last token of ``input_ids`` (none on the first call): the
        (batch, ceil(vocab / 32)) int32 bitmask of the tokens allowed next, bit 1 = allowed, on the
        host (this object's buffer, refilled by the next call). What ``__call__`` applies."""
        batch = int(input_ids.shape[0])
        if not self.matchers:
            self._start(batch)
        elif batch != len(self.matchers):
            raise GrammarError(f"batch size changed from {len(self.matchers)} to {batch} during generation")
        else:
            self._accept(input_ids[:, -1].tolist())
        generated = self._calls
        self._calls += 1
        live = self._live_rows()
        if len(live) < batch:
            self._bitmask.fill_(-1)  # finished rows: generate() pads them, leave their scores alone
        if self._batch_matcher is None:
            if live:
                self.matchers[0].fill_next_token_bitmask(self._bitmask, 0)
        elif live:
            self._batch_matcher.batch_fill_next_token_bitmask(
                [self.matchers[row] for row in live], self._bitmask, indices=live
            )
        # Rows where a step just ended (the stop token is allowed): stop now if another step
        # might not fit into the remaining budget.
        stop_bits = (self._bitmask[:, self._stop_words] >> self._stop_shifts) & 1
        live_rows = set(live)
        for row in stop_bits.any(dim=1).nonzero().flatten().tolist():
            if row not in live_rows:
                continue
            self._longest_step[row] = max(self._longest_step[row], generated - self._step_start[row])
            self._step_start[row] = generated + 1  # the next step starts after the newline
            remaining = self._row_budget[row] - generated  # tokens left, including the one chosen now
            reserve = (self._row_worst[row] if self._row_strict[row] else self._longest_step[row]) + 2
            if remaining < reserve:
                self._bitmask[row] &= self._only_stops
        return self._bitmask

    def _live_rows(self) -> list[int]:
        return [row for row, matcher in enumerate(self.matchers)
                if not matcher.is_terminated() and row not in self.released]

    def _accept(self, last_tokens: list[int]) -> None:
        import xgrammar as xgr

        live = self._live_rows()
        if not live:
            return
        if self._batch_matcher is None:
            accepted = [self.matchers[0].accept_token(last_tokens[0])]
        else:
            accepted = xgr.BatchGrammarMatcher.batch_accept_token(
                [self.matchers[row] for row in live], [last_tokens[row] for row in live]
            )
        for row, ok in zip(live, accepted):
            if not ok:
                raise GrammarError(f"row {row}: token {last_tokens[row]} was generated against the grammar")


def box_bounds(coordinate_convention: str, model_input_size: tuple[int, int]) -> tuple[int, int]:
    """Largest box coordinates the grammar allows for an image the model saw at ``model_input_size``
    (width, height): one below the edge, so no rounding can push a box outside the image; 999 for
    coordinates normalised to 0-1000."""
    if coordinate_convention == "normalized_1000":
        return (999, 999)
    return (max(1, model_input_size[0] - 1), max(1, model_input_size[1] - 1))


def allowed_tokens(bitmask, vocab_size: int):
    """The boolean mask (numpy, ``vocab_size``) of one row's bitmask (int32 words, bit 1 = allowed):
    for callers that mask numpy scores (the onnx backend)."""
    import numpy as np

    words = np.ascontiguousarray(np.asarray(bitmask, dtype=np.int32).reshape(-1)).astype("<i4")
    return np.unpackbits(words.view(np.uint8), bitorder="little")[:vocab_size].astype(bool)


def check_ebnf(ebnf: str) -> None:
    """Parse (not compile) the grammar text, so a bad vocabulary fails at configure, not per request."""
    import xgrammar as xgr

    try:
        xgr.Grammar.from_ebnf(ebnf)
    except Exception as error:
        raise GrammarError(f"xgrammar rejects the action grammar: {error}") from error
