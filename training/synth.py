"""Deterministic synthetic tabletop data: OpenCV-drawn scenes + English/Chinese commands.

Each sample is a picture of a table (wood or cloth texture from noise, a lighting gradient,
sensor noise) with 1-5 objects (colour x shape from the vocabulary's ``objects`` allowlist) and
1-3 containers (from ``destinations``), none overlapping, with ground-truth boxes in pixels; a
spoken-style command in English or Chinese; and the answer the model must learn, rendered by
``vla_node.actions.render_steps`` and wrapped by ``vla_node.prompt.PromptBuilder`` (never a copy
of either). Answers depend on the image wherever possible: the same sentence is an action when the
object is on the table and a CLARIFY when it is not; "the cube on the left" needs the picture.

Skills (``--skills``) and the answers they teach:

    move     "put the red cube in the blue bowl"          -> MOVE_OBJECT(object, destination)
    pick     "pick up the green ball" / "拿起绿色的球"      -> PICK_OBJECT(object)
    place    "put it in the blue bowl"                     -> PLACE_OBJECT(destination)
    spatial  "the cube on the left", "the ball nearest to the blue bowl", "the only cylinder"
             -> the referent's actual label (two objects sharing a label only occur when boxes are
                rendered: the box tells them apart)
    multi    "pick up X and then put it in Y"  -> PICK_OBJECT + PLACE_OBJECT
             "put X in Y and then put Z in W"  -> MOVE_OBJECT + MOVE_OBJECT
             Fixed rule: a command that sets the pick and the place out as steps, with a
             sequencing word (then, after that, 然后, 再), gets PICK_OBJECT then PLACE_OBJECT; a
             single put/move phrase is one MOVE_OBJECT, and so is a pick verb joined to a place
             verb by a plain "and" ("grab X and drop it in Y", 拿着X放进Y).
             If anything a multi-step command names is missing, the whole answer is one CLARIFY
             (never a partial plan).
    clarify  absent object/destination -> CLARIFY(reason="no red cube is visible");
             "the cube" with two cubes  -> CLARIFY(reason="the cube is ambiguous: 2 cubes are visible")
    stop     "stop" / "停下" -> STOP()

Labels and CLARIFY reasons are always the canonical English names (the system prompt says so),
whatever the command's language. The same seed gives byte-identical files; sample i depends only
on (seed, i) and the options, not on --num.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import cv2
import numpy as np

from vla_node.actions import ActionStep, Box, render_steps
from vla_node.prompt import PromptBuilder
from training.synth_language import Language
from training.synth_language import Ref as _Ref
from vla_node.vocabulary import Vocabulary

__all__ = [
    "SKILLS",
    "BOX_MODES",
    "SPLITS",
    "SynthConfig",
    "SynthError",
    "Thing",
    "SynthSample",
    "SynthReport",
    "Synthesizer",
    "generate_dataset",
    "parse_size",
]

SKILLS = ("move", "pick", "place", "spatial", "multi", "clarify", "stop")
SKILL_WEIGHTS = {"move": 3.0, "pick": 2.0, "place": 1.0, "spatial": 3.0, "multi": 2.0, "clarify": 2.0, "stop": 1.0}
BOX_MODES = ("none", "absolute_resized", "normalized_1000")
LANGUAGES = ("en", "zh")
SPLITS = ("train", "val", "test")
# Noisy images barely compress: Huffman-only + SUB filter is ~3x faster than zlib defaults, same size.
PNG_PARAMS = [int(cv2.IMWRITE_PNG_COMPRESSION), 1, int(cv2.IMWRITE_PNG_STRATEGY), int(cv2.IMWRITE_PNG_STRATEGY_HUFFMAN_ONLY),
              int(cv2.IMWRITE_PNG_FILTER), int(cv2.IMWRITE_PNG_FILTER_SUB)]
OUTPUT_FILES = ("train.json", "val.json", "test.json", "dataset_info.json", "synth_config.json")

# ---------------------------------------------------------------------------------------------
# Colours, shapes and their Chinese names
# ---------------------------------------------------------------------------------------------

COLOURS_BGR = {
    "red": (40, 40, 215), "green": (60, 175, 50), "blue": (205, 95, 25), "yellow": (35, 215, 235),
    "orange": (20, 135, 250), "purple": (160, 50, 135), "white": (238, 238, 238), "black": (30, 30, 30),
    "pink": (185, 130, 250), "brown": (35, 75, 130), "grey": (128, 128, 128), "gray": (128, 128, 128),
    "cyan": (215, 200, 40),
}
OBJECT_SHAPES = ("cube", "block", "ball", "sphere", "cylinder", "can", "cone")
CONTAINER_SHAPES = ("bowl", "tray", "box", "plate", "basket")
# Table looks (BGR base colours)
_WOODS = ((55, 95, 145), (40, 75, 120), (85, 135, 185), (70, 110, 160), (95, 150, 200))
_CLOTHS = ((60, 115, 55), (150, 150, 150), (165, 195, 210), (140, 105, 70), (95, 85, 120), (200, 200, 200))


class SynthError(ValueError):
    """The options cannot produce the requested data (the message says why)."""


def parse_size(text: str) -> tuple[int, int]:
    """'320x240' -> (320, 240)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SynthError(f"size must be WIDTHxHEIGHT, e.g. 320x240, got {text!r}") from None
    if not (64 <= w <= 4096 and 64 <= h <= 4096):
        raise SynthError(f"size {w}x{h} out of range (64..4096 per side)")
    return w, h


def _plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("s", "x", "ch", "sh")) else "s")


# ---------------------------------------------------------------------------------------------
# Configuration and results
# ---------------------------------------------------------------------------------------------


@dataclass
class SynthConfig:
    num: int = 1000
    seed: int = 0
    size: tuple[int, int] = (320, 240)  # (width, height)
    languages: tuple[str, ...] = LANGUAGES
    val_frac: float = 0.1
    test_frac: float = 0.1
    skills: tuple[str, ...] = SKILLS
    objects: Optional[tuple[str, ...]] = None  # restrict object labels (default: every drawable one)
    destinations: Optional[tuple[str, ...]] = None  # restrict destination labels
    boxes: str = "none"  # none | absolute_resized | normalized_1000
    min_pixels: int = 56 * 56  # processor pixel limits, used for absolute_resized boxes only
    max_pixels: int = 28 * 28 * 1280
    factor: int = 28  # patch_size * merge_size (28 Qwen2/2.5-VL, 32 Qwen3-VL)
    vocab_path: Optional[str] = None
    name_prefix: str = "tabletop"
    # at most this many objects / containers per scene beyond those a command needs (None: the
    # generator's own draws); 1 and 0 make scenes where the named object is the only thing to find
    max_objects: Optional[int] = None
    max_containers: Optional[int] = None
    # how often (with the clarify skill on) a multi-step command names one thing that is not there
    missing_rate: float = 0.2
    # the absent thing a multi-step command names shares a colour or shape with one on the table
    # (hard negatives, as the single-step CLARIFY scenes draw mostly); False: any absent label
    missing_lookalikes: bool = False

    def check(self) -> None:
        if self.num < 1:
            raise SynthError("--num must be at least 1")
        bad = [s for s in self.skills if s not in SKILLS]
        if bad or not self.skills:
            raise SynthError(f"unknown skills {bad} (known: {', '.join(SKILLS)})" if bad else "no skills given")
        bad = [lang for lang in self.languages if lang not in LANGUAGES]
        if bad or not self.languages:
            raise SynthError(f"unknown languages {bad} (known: en, zh)" if bad else "no languages given")
        if (self.max_objects is not None and self.max_objects < 1) or (
                self.max_containers is not None and self.max_containers < 0):
            raise SynthError("--max-objects must be at least 1 and --max-containers at least 0")
        if not 0 <= self.missing_rate <= 1:
            raise SynthError(f"--missing-rate must be in [0, 1], got {self.missing_rate}")
        if self.boxes not in BOX_MODES:
            raise SynthError(f"--boxes must be one of {', '.join(BOX_MODES)}, got {self.boxes!r}")
        if not (0 <= self.val_frac < 1 and 0 <= self.test_frac < 1 and self.val_frac + self.test_frac < 1):
            raise SynthError("--val-frac and --test-frac must be in [0, 1) and sum to less than 1")


@dataclass
class Thing:
    """One drawn object or container; box = (x_min, y_min, x_max, y_max) pixels, max exclusive."""

    label: str
    colour: str
    shape: str
    kind: str  # "object" | "container"
    box: tuple[int, int, int, int]

    @property
    def center(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2.0, (self.box[1] + self.box[3]) / 2.0

    def as_box(self) -> Box:
        return Box(x_min=self.box[0], y_min=self.box[1], x_max=self.box[2], y_max=self.box[3])


@dataclass
class SynthSample:
    index: int
    image: np.ndarray  # BGR uint8 (cv2 order, as written to PNG)
    command: str
    language: str
    skill: str
    kind: str  # finer label, e.g. "move", "clarify_absent", "spatial_side"
    steps: list[ActionStep]
    answer: str
    things: list[Thing]
    messages: list[dict] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------


def _shade(colour: Sequence[int], f: float) -> tuple[int, int, int]:
    return tuple(int(min(255, max(0, c * f))) for c in colour)  # type: ignore[return-value]


def _lighten(colour: Sequence[int], f: float) -> tuple[int, int, int]:
    return tuple(int(c + (255 - c) * f) for c in colour)  # type: ignore[return-value]


class _Canvas:
    """Per-size caches (coordinate grids, a gaussian noise bank) so a scene costs ~1-2 ms to paint."""

    def __init__(self, w: int, h: int, seed: int):
        self.w, self.h = w, h
        yy, xx = np.mgrid[0:h, 0:w]
        self.xx, self.yy = xx, yy
        self.along_x = np.arange(w, dtype=np.float32)[None, :]
        self.along_y = np.arange(h, dtype=np.float32)[:, None]
        self._weaves: dict[int, np.ndarray] = {}
        # low-resolution grid for the (smooth) lighting field
        self.lw, self.lh = max(2, w // 8), max(2, h // 8)
        ly, lx = np.mgrid[0:self.lh, 0:self.lw].astype(np.float32)
        self.lx, self.ly = (lx + 0.5) / self.lw, (ly + 0.5) / self.lh
        # N(0, 1) sensor-noise bank, twice the image size: each sample takes a random window of it
        noise_rng = np.random.default_rng([seed, 0x5EED])
        self.noise = noise_rng.standard_normal((2 * h, 2 * w, 3), dtype=np.float32)

    def weave(self, period: int) -> np.ndarray:
        if period not in self._weaves:
            self._weaves[period] = ((((self.xx // period) + (self.yy // period)) % 2).astype(np.float32) - 0.5)
        return self._weaves[period]

    def table(self, rng: np.random.Generator) -> np.ndarray:
        """uint8 HxWx3 table texture (BGR): wavy wood grain or a cloth weave, from noise."""
        w, h = self.w, self.h
        low = cv2.resize(rng.standard_normal((h // 24 + 2, w // 24 + 2)).astype(np.float32), (w, h),
                         interpolation=cv2.INTER_LINEAR)
        if rng.random() < 0.5:  # wood
            base = np.array(_WOODS[rng.integers(len(_WOODS))], np.float32)
            along = self.along_x if rng.random() < 0.5 else self.along_y
            shade = 1.0 + 0.10 * np.sin(along * np.float32(rng.uniform(0.15, 0.45)) + low * np.float32(
                rng.uniform(2.0, 5.0))) + 0.05 * low
        else:  # cloth
            base = np.array(_CLOTHS[rng.integers(len(_CLOTHS))], np.float32)
            shade = 1.0 + 0.05 * self.weave(int(rng.integers(2, 5))) + 0.07 * low
        out = cv2.merge([shade * base[0], shade * base[1], shade * base[2]])  # (broadcasting is ~10x slower)
        return np.clip(out, 0, 255, out=out).astype(np.uint8)

    def lighting(self, rng: np.random.Generator) -> np.ndarray:
        """float32 HxW multiplicative light: a directional ramp plus a soft spot."""
        angle = rng.uniform(0, 2 * math.pi)
        ramp = np.cos(angle) * (self.lx - 0.5) + np.sin(angle) * (self.ly - 0.5)
        light = rng.uniform(0.92, 1.05) + rng.uniform(0.1, 0.3) * ramp
        sx, sy = rng.uniform(0, 1), rng.uniform(0, 1)
        spot = np.exp(-((self.lx - sx) ** 2 + ((self.ly - sy) * self.h / self.w) ** 2) / (2 * 0.35 ** 2))
        light = (light + rng.uniform(0.0, 0.12) * spot).astype(np.float32)
        return cv2.resize(light, (self.w, self.h), interpolation=cv2.INTER_LINEAR)

    def finish(self, rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
        """Apply lighting and gaussian sensor noise to the painted uint8 image."""
        out = img.astype(np.float32)
        light = self.lighting(rng)
        out = cv2.multiply(out, cv2.merge([light, light, light]))
        oy, ox = int(rng.integers(self.h)), int(rng.integers(self.w))
        out += self.noise[oy:oy + self.h, ox:ox + self.w] * np.float32(rng.uniform(1.5, 4.0))
        out += 0.5
        return np.clip(out, 0, 255, out=out).astype(np.uint8)


def _draw_shadow(img: np.ndarray, box, round_shape: bool) -> None:
    x0, y0, x1, y1 = box
    off = 3
    roi = img[y0 + off:y1 + off, x0 + off:x1 + off]
    if roi.size == 0:
        return
    mask = np.zeros(roi.shape[:2], np.uint8)
    if round_shape:
        cv2.ellipse(mask, ((roi.shape[1] / 2, roi.shape[0] / 2), (roi.shape[1], roi.shape[0]), 0), 255, -1)
    else:
        mask[:] = 255
    roi[mask > 0] = (roi[mask > 0] * 0.72).astype(np.uint8)


def _draw_thing(img: np.ndarray, t: Thing, colour: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = t.box
    w, h = x1 - x0, y1 - y0
    xr, yb = x1 - 1, y1 - 1  # last pixel column / row (cv2 endpoints are inclusive)
    aa = cv2.LINE_AA
    if t.shape in ("cube", "block"):
        d = max(3, int(0.28 * min(w, h)))
        _draw_shadow(img, t.box, False)
        cv2.rectangle(img, (x0, y0 + d), (xr - d, yb), colour, -1)
        top = np.array([[x0, y0 + d], [x0 + d, y0], [xr, y0], [xr - d, y0 + d]], np.int32)
        side = np.array([[xr - d, y0 + d], [xr, y0], [xr, yb - d], [xr - d, yb]], np.int32)
        cv2.fillConvexPoly(img, top, _lighten(colour, 0.35), aa)
        cv2.fillConvexPoly(img, side, _shade(colour, 0.7), aa)
    elif t.shape in ("ball", "sphere"):
        _draw_shadow(img, t.box, True)
        r = w // 2
        c = (x0 + r, y0 + r)
        cv2.circle(img, c, r, colour, -1, aa)
        cv2.circle(img, (c[0] - r // 3, c[1] - r // 3), max(2, r // 3), _lighten(colour, 0.55), -1, aa)
    elif t.shape in ("cylinder", "can"):
        _draw_shadow(img, t.box, False)
        eh = max(4, h // 4)
        cv2.rectangle(img, (x0, y0 + eh // 2), (xr, yb - eh // 2), colour, -1)
        cv2.ellipse(img, ((x0 + w / 2, yb - eh / 2), (w, eh), 0), colour, -1, aa)
        cv2.rectangle(img, (x0 + w * 2 // 3, y0 + eh // 2), (xr, yb - eh // 2), _shade(colour, 0.8), -1)
        cv2.ellipse(img, ((x0 + w / 2, y0 + eh / 2), (w, eh), 0), _lighten(colour, 0.35), -1, aa)
    elif t.shape == "cone":
        _draw_shadow(img, t.box, True)
        eh = max(4, h // 4)
        cv2.ellipse(img, ((x0 + w / 2, yb - eh / 2), (w, eh), 0), _shade(colour, 0.85), -1, aa)
        tri = np.array([[x0, yb - eh // 2], [x0 + w // 2, y0], [xr, yb - eh // 2]], np.int32)
        cv2.fillConvexPoly(img, tri, colour, aa)
        cv2.line(img, (x0 + w // 2, y0), (x0 + w // 2 + w // 6, yb - eh // 2), _lighten(colour, 0.3), 1, aa)
    elif t.shape in ("bowl", "plate"):
        _draw_shadow(img, t.box, True)
        center = (x0 + w / 2, y0 + h / 2)
        cv2.ellipse(img, (center, (w, h), 0), colour, -1, aa)
        inner = _shade(colour, 0.65) if t.shape == "bowl" else _lighten(colour, 0.25)
        f = 0.72 if t.shape == "bowl" else 0.62
        cv2.ellipse(img, ((center[0], center[1] + (0.04 * h if t.shape == "bowl" else 0)), (w * f, h * f), 0),
                    inner, -1, aa)
        cv2.ellipse(img, (center, (w, h), 0), _shade(colour, 0.8), 1, aa)
    else:  # tray, box, basket: rectangles with a rim
        _draw_shadow(img, t.box, False)
        rim = max(3, int(0.12 * min(w, h)))
        cv2.rectangle(img, (x0, y0), (xr, yb), _shade(colour, 0.8), -1)
        inner = _lighten(colour, 0.15) if t.shape == "tray" else _shade(colour, 0.55)
        cv2.rectangle(img, (x0 + rim, y0 + rim), (xr - rim, yb - rim), inner, -1)
        if t.shape == "basket":
            for x in range(x0 + rim, xr - rim, max(4, w // 8)):
                cv2.line(img, (x, y0 + rim), (x, yb - rim), _shade(colour, 0.4), 1)
        elif t.shape == "box":
            cv2.line(img, (x0, y0), (x0 + rim, y0 + rim), _shade(colour, 0.5), 1, aa)
            cv2.line(img, (xr, y0), (xr - rim, y0 + rim), _shade(colour, 0.5), 1, aa)


# ---------------------------------------------------------------------------------------------
# The generator
# ---------------------------------------------------------------------------------------------


def _split_label(label: str) -> tuple[str, str]:
    words = label.split()
    colour = words[0] if len(words) > 1 and words[0] in COLOURS_BGR else ""
    return colour, words[-1] if words else ""


class _Retry(Exception):
    """This attempt cannot satisfy its kind; draw another."""


class Synthesizer:
    """Makes SynthSamples; ``sample(i)`` depends only on (config, i)."""

    def __init__(self, cfg: SynthConfig, vocab: Optional[Vocabulary] = None):
        cfg.check()
        self.cfg = cfg
        self.vocab = vocab if vocab is not None else Vocabulary.load(cfg.vocab_path)
        self.prompt = PromptBuilder(self.vocab)
        self.lang = Language(self.vocab)
        self.w, self.h = cfg.size
        self.canvas = _Canvas(self.w, self.h, cfg.seed)
        self.objects = self._labels(self.vocab.objects, cfg.objects, OBJECT_SHAPES, "objects", _DEFAULT_OBJECTS)
        self.containers = self._labels(self.vocab.destinations, cfg.destinations, CONTAINER_SHAPES,
                                       "destinations", _DEFAULT_DESTINATIONS)
        self.by_shape: dict[str, list[str]] = {}
        for label in self.objects:
            self.by_shape.setdefault(_split_label(label)[1], []).append(label)
        verbs = self.vocab.verbs
        needs = {"move": ("MOVE_OBJECT",), "pick": ("PICK_OBJECT",), "place": ("PLACE_OBJECT",),
                 "spatial": (), "multi": (), "clarify": ("CLARIFY",), "stop": ("STOP",)}
        self.skills = [s for s in cfg.skills if all(v in verbs for v in needs[s])]
        if "spatial" in self.skills and not ({"MOVE_OBJECT", "PICK_OBJECT"} & set(verbs)):
            self.skills.remove("spatial")
        if "multi" in self.skills and not ({"MOVE_OBJECT"} <= set(verbs)
                                           or {"PICK_OBJECT", "PLACE_OBJECT"} <= set(verbs)):
            self.skills.remove("multi")
        if not self.skills:
            raise SynthError(f"none of the skills {list(cfg.skills)} can be expressed with the vocabulary's verbs "
                             f"({', '.join(verbs)})")
        weights = np.array([SKILL_WEIGHTS[s] for s in self.skills])
        self.skill_p = weights / weights.sum()
        self.codec = self._codec()

    # ---- set-up -------------------------------------------------------------------------------
    def _labels(self, allow, restrict, shapes, what, default) -> list[str]:
        pool = sorted(allow) if allow is not None else list(default)
        if restrict:
            wanted = [self.vocab.normalise_label(x) for x in restrict]
            unknown = [x for x in wanted if x not in pool]
            if unknown:
                raise SynthError(f"--{what}: {unknown} not in the vocabulary's {what}")
            pool = sorted(set(wanted))
        drawable = [x for x in pool if _split_label(x)[0] and _split_label(x)[1] in shapes]
        if not drawable:
            raise SynthError(f"no drawable {what} (colour + one of {', '.join(shapes)}) in {pool[:8]}")
        return drawable

    def _codec(self):
        if self.cfg.boxes == "none":
            return None
        from vla_node.parser import BoxCodec

        if self.cfg.boxes == "absolute_resized":
            return BoxCodec("absolute_resized", (self.w, self.h), self.model_input_size())
        return BoxCodec("normalized_1000", (self.w, self.h), None)

    def model_input_size(self) -> tuple[int, int]:
        """(width, height) the model sees after the processor's smart_resize."""
        from vla_node.image import PixelLimits, smart_resize

        limits = PixelLimits(min_pixels=self.cfg.min_pixels, max_pixels=self.cfg.max_pixels, factor=self.cfg.factor)
        rh, rw = smart_resize(self.h, self.w, limits)
        return rw, rh

    # ---- scene layout -------------------------------------------------------------------------
    def _layout(self, rng, objects: list[str], containers: list[str]) -> list[Thing]:
        """Place things without overlap (containers first); raises _Retry when they do not fit."""
        w, h = self.w, self.h
        m = min(w, h)
        placed: list[Thing] = []
        gap = max(6, m // 40)
        for kind, labels in (("container", containers), ("object", objects)):
            for label in labels:
                colour, shape = _split_label(label)
                if kind == "container":
                    if shape in ("bowl", "plate"):
                        bw = max(20, int(m * rng.uniform(0.24, 0.32)))
                        bh = int(bw * rng.uniform(0.6, 0.75))
                    else:
                        bw = max(22, int(m * rng.uniform(0.28, 0.38)))
                        bh = int(bw * rng.uniform(0.55, 0.8))
                else:
                    s = max(10, int(m * rng.uniform(0.10, 0.15)))  # >= 10 px: tiny images stay legible
                    if shape in ("cylinder", "can", "cone"):
                        bw, bh = s, int(s * 1.3)
                    else:
                        bw = bh = s
                for _ in range(60):
                    x0 = int(rng.integers(4, w - bw - 4))
                    y0 = int(rng.integers(4, h - bh - 4))
                    box = (x0, y0, x0 + bw, y0 + bh)
                    if all(box[2] + gap <= t.box[0] or t.box[2] + gap <= box[0] or
                           box[3] + gap <= t.box[1] or t.box[3] + gap <= box[1] for t in placed):
                        placed.append(Thing(label, colour, shape, kind, box))
                        break
                else:
                    raise _Retry("scene too crowded")
        return placed

    def _render(self, rng, things: list[Thing]) -> np.ndarray:
        img = self.canvas.table(rng)
        for t in things:  # containers first (they were placed first)
            jitter = rng.integers(-12, 13, size=3)
            colour = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLOURS_BGR[t.colour], jitter))
            _draw_thing(img, t, colour)
        return self.canvas.finish(rng, img)

    # ---- helpers for kinds --------------------------------------------------------------------
    @staticmethod
    def _choice(rng, seq):
        seq = list(seq)
        if not seq:
            raise _Retry("empty choice")
        return seq[int(rng.integers(len(seq)))]

    def _sample(self, rng, pool, k) -> list:
        pool = list(pool)
        if k > len(pool):
            raise _Retry("not enough labels")
        idx = rng.permutation(len(pool))[:k]
        return [pool[int(i)] for i in idx]

    def _scene(self, rng, must_objects: Sequence[str] = (), n_obj: Optional[int] = None,
               must_containers: Sequence[str] = (), n_cont: Optional[int] = None,
               avoid_objects: Sequence[str] = (), avoid_containers: Sequence[str] = (),
               avoid_shapes: Sequence[str] = ()) -> list[Thing]:
        """Objects: the ``must_objects`` (duplicates allowed) + distinct random others."""
        n_obj = n_obj if n_obj is not None else int(rng.integers(1, 6))
        if self.cfg.max_objects is not None:
            n_obj = min(n_obj, self.cfg.max_objects)
        n_obj = max(n_obj, len(must_objects))
        others = [x for x in self.objects if x not in must_objects and x not in avoid_objects
                  and _split_label(x)[1] not in avoid_shapes]
        extra = self._sample(rng, others, min(n_obj - len(must_objects), len(others)))
        objects = list(must_objects) + extra
        n_cont = n_cont if n_cont is not None else int(rng.integers(1, 4))
        if self.cfg.max_containers is not None:
            n_cont = min(n_cont, self.cfg.max_containers)
        n_cont = max(n_cont, len(must_containers))
        others_c = [x for x in self.containers if x not in must_containers and x not in avoid_containers]
        containers = list(must_containers) + self._sample(rng, others_c, min(n_cont - len(must_containers),
                                                                            len(others_c)))
        order = rng.permutation(len(objects))
        return self._layout(rng, [objects[int(i)] for i in order], containers)

    def _step(self, verb: str, obj: Optional[Thing] = None, dst: Optional[Thing] = None) -> ActionStep:
        kw: dict = {"verb": verb}
        if obj is not None:
            kw["object"] = obj.label
            if self.codec is not None:
                kw["object_box"] = obj.as_box()
        if dst is not None:
            kw["destination"] = dst.label
            if self.codec is not None:
                kw["destination_box"] = dst.as_box()
        return ActionStep(**kw)

    @staticmethod
    def _clarify(reason: str) -> ActionStep:
        return ActionStep(verb="CLARIFY", reason=reason)

    def _has(self, *verbs: str) -> bool:
        return all(v in self.vocab.verbs for v in verbs)

    @staticmethod
    def _objs(things):
        return [t for t in things if t.kind == "object"]

    @staticmethod
    def _conts(things):
        return [t for t in things if t.kind == "container"]

    def _act_on(self, rng, lang, o_text: str, target: Optional[Thing], things) -> tuple[str, list[ActionStep]]:
        """A single-object command (move or pick, whichever the vocabulary has) naming ``o_text``;
        the steps act on ``target`` (None: the caller answers CLARIFY and ignores them)."""
        conts = self._conts(things)
        can_move, can_pick = self._has("MOVE_OBJECT") and bool(conts), self._has("PICK_OBJECT")
        if can_move and (not can_pick or rng.random() < 0.55):
            d = self._choice(rng, conts)
            steps = [self._step("MOVE_OBJECT", target, d)] if target is not None else []
            return self.lang.move(rng, lang, o_text, d), steps
        if not can_pick:
            raise _Retry("no verb")
        return self.lang.pick(rng, lang, o_text), [self._step("PICK_OBJECT", target)] if target is not None else []

    # ---- kinds --------------------------------------------------------------------------------
    def _kind_move(self, rng, lang):
        things = self._scene(rng, n_obj=int(rng.integers(1, 6)), n_cont=int(rng.integers(1, 4)))
        o = self._choice(rng, self._objs(things))
        d = self._choice(rng, self._conts(things))
        text = self.lang.move(rng, lang, self.lang.ref(rng, lang, _Ref("label", o.label)), d)
        return things, text, [self._step("MOVE_OBJECT", o, d)], "move"

    def _kind_pick(self, rng, lang):
        things = self._scene(rng)
        o = self._choice(rng, self._objs(things))
        text = self.lang.pick(rng, lang, self.lang.ref(rng, lang, _Ref("label", o.label)))
        return things, text, [self._step("PICK_OBJECT", o)], "pick"

    def _kind_place(self, rng, lang):
        things = self._scene(rng, n_obj=int(rng.integers(0, 5)))
        d = self._choice(rng, self._conts(things))
        return things, self.lang.place(rng, lang, d), [self._step("PLACE_OBJECT", None, d)], "place"

    def _kind_stop(self, rng, lang):
        things = self._scene(rng)
        return things, self.lang.stop(rng, lang), [ActionStep(verb="STOP")], "stop"

    def _group(self, rng, min_size: int = 2) -> tuple[str, list[str]]:
        """A noun and 2-3 object labels it covers: same shape, or (boxes only) the same label."""
        if self.codec is not None and rng.random() < 0.35:
            label = self._choice(rng, self.objects)
            return label, [label] * int(rng.integers(min_size, 4))
        shapes = [s for s, labels in sorted(self.by_shape.items()) if len(labels) >= min_size]
        shape = self._choice(rng, shapes)
        k = int(rng.integers(min_size, min(3, len(self.by_shape[shape])) + 1))
        return shape, self._sample(rng, self.by_shape[shape], k)

    def _members(self, things, noun) -> list[Thing]:
        return [t for t in self._objs(things) if t.label == noun or t.shape == noun]

    def _kind_spatial(self, rng, lang):
        sub = self._choice(rng, ("side", "side", "nearest", "only", "colour"))
        if sub in ("side", "nearest"):
            noun, labels = self._group(rng)
            things = self._scene(rng, must_objects=labels, n_obj=len(labels) + int(rng.integers(0, 3)))
            group = self._members(things, noun)
            if sub == "side":
                side = "left" if rng.random() < 0.5 else "right"
                xs = sorted(group, key=lambda t: t.center[0], reverse=(side == "right"))
                if abs(xs[0].center[0] - xs[1].center[0]) < max(12, 0.08 * self.w):
                    raise _Retry("no clear side")
                target, ref = xs[0], _Ref("side", noun, side=side)
            else:
                anchor = self._choice(rng, self._conts(things))
                ds = sorted(group, key=lambda t: math.dist(t.center, anchor.center))
                d0, d1 = math.dist(ds[0].center, anchor.center), math.dist(ds[1].center, anchor.center)
                if d1 - d0 < max(15, 0.25 * d0):
                    raise _Retry("no clear nearest")
                target, ref = ds[0], _Ref("nearest", noun, anchor=anchor)
        elif sub == "only":
            shape = self._choice(rng, sorted(self.by_shape))
            label = self._choice(rng, self.by_shape[shape])
            things = self._scene(rng, must_objects=[label], n_obj=int(rng.integers(2, 6)), avoid_shapes=[shape])
            if len(self._objs(things)) < 2:
                raise _Retry("'only' needs company")
            target = next(t for t in self._objs(things) if t.label == label)
            ref = _Ref("only" if rng.random() < 0.6 else "shape", shape)
        else:  # colour: the only object of its colour, no container of that colour either
            label = self._choice(rng, self.objects)
            colour = _split_label(label)[0]
            same_colour = [x for x in self.objects if _split_label(x)[0] == colour and x != label]
            things = self._scene(rng, must_objects=[label], n_obj=int(rng.integers(2, 5)),
                                 avoid_objects=same_colour,
                                 avoid_containers=[c for c in self.containers if _split_label(c)[0] == colour])
            if len(self._objs(things)) < 2:
                raise _Retry("'colour' needs company")
            target = next(t for t in self._objs(things) if t.label == label)
            ref = _Ref("colour", label, colour=colour)
        text, steps = self._act_on(rng, lang, self.lang.ref(rng, lang, ref), target, things)
        return things, text, steps, f"spatial_{ref.kind}"

    def _kind_multi(self, rng, lang):
        if self._has("PICK_OBJECT", "PLACE_OBJECT") and (not self._has("MOVE_OBJECT") or rng.random() < 0.6):
            things = self._scene(rng)
            o = self._choice(rng, self._objs(things))
            d = self._choice(rng, self._conts(things))
            o_text = self.lang.ref(rng, lang, _Ref("label", o.label))
            missing = self._maybe_missing(rng, things)
            if missing is not None:
                slot, absent = missing
                if slot == "o":
                    o_text = self.lang.ref(rng, lang, _Ref("label", absent.label))
                else:
                    d = absent
                text = self.lang.pick_place(rng, lang, o_text, d)
                return things, text, [self._clarify(f"no {absent.label} is visible")], "multi_clarify_absent"
            text = self.lang.pick_place(rng, lang, o_text, d)
            return things, text, [self._step("PICK_OBJECT", o), self._step("PLACE_OBJECT", None, d)], \
                "multi_pick_place"
        things = self._scene(rng, n_obj=int(rng.integers(2, 6)))
        objs = self._objs(things)
        if len(objs) < 2:
            raise _Retry("two objects needed")
        o1, o2 = self._sample(rng, objs, 2)
        conts = self._conts(things)
        d1, d2 = self._choice(rng, conts), self._choice(rng, conts)
        texts = [self.lang.ref(rng, lang, _Ref("label", o1.label)), self.lang.ref(rng, lang, _Ref("label", o2.label))]
        dests = [d1, d2]
        missing = self._maybe_missing(rng, things)
        if missing is not None:
            slot, absent = missing
            k = int(rng.integers(2))  # either step may name the missing thing
            if slot == "o":
                texts[k] = self.lang.ref(rng, lang, _Ref("label", absent.label))
            else:
                dests[k] = absent
            text = self.lang.move_move(rng, lang, texts[0], dests[0], texts[1], dests[1])
            return things, text, [self._clarify(f"no {absent.label} is visible")], "multi_clarify_absent"
        text = self.lang.move_move(rng, lang, texts[0], d1, texts[1], d2)
        return things, text, [self._step("MOVE_OBJECT", o1, d1), self._step("MOVE_OBJECT", o2, d2)], \
            "multi_move_move"

    def _maybe_missing(self, rng, things) -> Optional[tuple[str, Thing]]:
        """With the clarify skill on, now and then a multi-step command names something absent:
        returns ("o" | "d", the absent Thing, unplaced) or None."""
        if "clarify" not in self.skills or rng.random() >= self.cfg.missing_rate:
            return None
        present = {t.label for t in things}
        slot = "o" if rng.random() < 0.6 else "d"
        pool = self.objects if slot == "o" else self.containers
        absent = [x for x in pool if x not in present]
        if self.cfg.missing_lookalikes:  # those sharing a colour or shape with a present thing of the slot's kind
            seen = [t for t in things if t.kind == ("object" if slot == "o" else "container")]
            colours, shapes = {t.colour for t in seen}, {t.shape for t in seen}
            absent = [x for x in absent if _split_label(x)[0] in colours or _split_label(x)[1] in shapes] or absent
        if not absent:
            return None
        label = self._choice(rng, absent)
        colour, shape = _split_label(label)
        return slot, Thing(label, colour, shape, "object" if slot == "o" else "container", (0, 0, 1, 1))

    def _kind_clarify(self, rng, lang):
        subs = ["absent_object", "absent_object", "ambiguous", "ambiguous"]
        if self._has("MOVE_OBJECT") or self._has("PLACE_OBJECT"):
            subs.append("absent_destination")
        sub = self._choice(rng, subs)
        if sub == "absent_object":
            label = self._choice(rng, self.objects)
            colour, shape = _split_label(label)
            # hard negatives: a same-shape or same-colour object is usually there
            similar = [x for x in self.objects if x != label and (_split_label(x)[1] == shape
                                                                  or _split_label(x)[0] == colour)]
            must = [self._choice(rng, similar)] if similar and rng.random() < 0.7 else []
            things = self._scene(rng, must_objects=must, avoid_objects=[label])
            if rng.random() < 0.2 and not any(t.shape == shape for t in self._objs(things)):
                # "the ball on the left" with no ball at all
                ref = _Ref("side", shape, side="left" if rng.random() < 0.5 else "right")
                reason = f"no {shape} is visible"
            else:
                ref, reason = _Ref("label", label), f"no {label} is visible"
            text, _ = self._act_on(rng, lang, self.lang.ref(rng, lang, ref), None, things)
            return things, text, [self._clarify(reason)], "clarify_absent"
        if sub == "absent_destination":
            label = self._choice(rng, self.containers)
            things = self._scene(rng, avoid_containers=[label], n_obj=int(rng.integers(1, 5)))
            colour, shape = _split_label(label)
            ghost = Thing(label, colour, shape, "container", (0, 0, 1, 1))
            if self._has("MOVE_OBJECT") and (not self._has("PLACE_OBJECT") or rng.random() < 0.6):
                o = self._choice(rng, self._objs(things))
                text = self.lang.move(rng, lang, self.lang.ref(rng, lang, _Ref("label", o.label)), ghost)
            else:
                text = self.lang.place(rng, lang, ghost)
            return things, text, [self._clarify(f"no {label} is visible")], "clarify_absent"
        # ambiguous: the command names a shape (or, with boxes, a label) that several objects match
        noun, labels = self._group(rng)
        things = self._scene(rng, must_objects=labels, n_obj=len(labels) + int(rng.integers(0, 3)))
        n = len(self._members(things, noun))
        ref = _Ref("label" if " " in noun else "shape", noun)
        text, _ = self._act_on(rng, lang, self.lang.ref(rng, lang, ref), None, things)
        reason = f"the {noun} is ambiguous: {n} {_plural(noun)} are visible"
        return things, text, [self._clarify(reason)], "clarify_ambiguous"

    # ---- public -------------------------------------------------------------------------------
    def sample(self, index: int, render: bool = True) -> SynthSample:
        """Sample ``index``; ``render=False`` leaves ``image`` None (the text costs a fraction of the
        picture, and the image is drawn last, so every other field is the same)."""
        rng = np.random.default_rng([self.cfg.seed, index])
        for _ in range(200):
            skill = self.skills[int(rng.choice(len(self.skills), p=self.skill_p))]
            lang = self.cfg.languages[int(rng.integers(len(self.cfg.languages)))]
            try:
                things, command, steps, kind = getattr(self, f"_kind_{skill}")(rng, lang)
            except _Retry:
                continue
            answer = render_steps(steps, self.vocab, self.codec)
            image = self._render(rng, things) if render else None
            return SynthSample(index=index, image=image, command=command, language=lang, skill=skill, kind=kind,
                               steps=steps, answer=answer, things=things,
                               messages=self.prompt.sharegpt_messages(command, answer))
        raise SynthError(f"sample {index}: could not generate any of the skills {self.skills} with these "
                         "objects/destinations (too few labels or too small an image?)")

    def texts(self, indices: Sequence[int], workers: int = 1) -> list[list[dict]]:
        """The ShareGPT messages of these samples, without drawing their pictures."""
        if workers <= 1 or len(indices) < 2048:
            return [self.sample(i, render=False).messages for i in indices]
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(workers, _init_worker, (self.cfg,)) as pool:
            return pool.map(_messages_of_sample, indices, chunksize=256)

    def samples(self, indices: Optional[Sequence[int]] = None) -> Iterator[SynthSample]:
        for i in (indices if indices is not None else range(self.cfg.num)):
            yield self.sample(i)

    def splits(self) -> dict[str, list[int]]:
        """Deterministic split of range(num): exact counts, independent of the samples' content."""
        n = self.cfg.num
        n_test = int(round(n * self.cfg.test_frac))
        n_val = int(round(n * self.cfg.val_frac))
        if n_test + n_val >= n:
            n_test, n_val = min(n_test, max(0, n - 1)), max(0, min(n_val, n - 1 - min(n_test, n - 1)))
        perm = np.random.default_rng([self.cfg.seed, 2**31 - 1]).permutation(n)
        return {"test": sorted(int(i) for i in perm[:n_test]),
                "val": sorted(int(i) for i in perm[n_test:n_test + n_val]),
                "train": sorted(int(i) for i in perm[n_test + n_val:])}


_DEFAULT_OBJECTS = tuple(f"{c} {s}" for c in ("red", "green", "blue", "yellow") for s in ("cube", "ball", "cylinder"))
_DEFAULT_DESTINATIONS = tuple(f"{c} bowl" for c in ("red", "green", "blue", "white")) + ("blue tray", "white plate")


# ---------------------------------------------------------------------------------------------
# Writing a dataset directory
# ---------------------------------------------------------------------------------------------


@dataclass
class SynthReport:
    out_dir: Path
    counts: dict[str, int]
    kinds: dict[str, int]
    languages: dict[str, int]
    seconds: float

    def summary(self) -> str:
        total = sum(self.counts.values())
        lines = [f"wrote {total} samples to {self.out_dir} in {self.seconds:.1f} s "
                 f"({1000 * self.seconds / max(1, total):.1f} ms/sample)",
                 "  splits: " + ", ".join(f"{k} {v}" for k, v in self.counts.items()),
                 "  languages: " + ", ".join(f"{k} {v}" for k, v in sorted(self.languages.items())),
                 "  kinds: " + ", ".join(f"{k} {v}" for k, v in sorted(self.kinds.items()))]
        return "\n".join(lines)


_WORKER_SYNTH: Optional["Synthesizer"] = None


def _init_worker(cfg: SynthConfig) -> None:
    global _WORKER_SYNTH
    _WORKER_SYNTH = Synthesizer(cfg, None)


def _encode(syn: "Synthesizer", index: int) -> tuple[int, bytes, list, str, str]:
    s = syn.sample(index)
    ok, buf = cv2.imencode(".png", s.image, PNG_PARAMS)
    if not ok:
        raise SynthError(f"PNG encoding failed for sample {index}")
    return index, buf.tobytes(), s.messages, s.kind, s.language


def _encode_sample(index: int) -> tuple[int, bytes, list, str, str]:
    return _encode(_WORKER_SYNTH, index)


def _messages_of_sample(index: int) -> list[dict]:
    return _WORKER_SYNTH.sample(index, render=False).messages


def remove_outputs(out: Path, files: Sequence[str]) -> None:
    """A generator's own outputs in ``out``: its images/ and ``files``; nothing else there is touched."""
    shutil.rmtree(out / "images", ignore_errors=True)
    for name in files:
        (out / name).unlink(missing_ok=True)


def generate_dataset(out_dir, cfg: SynthConfig, vocab: Optional[Vocabulary] = None,
                     overwrite: bool = False, workers: int = 1,
                     only: Optional[dict[str, list[int]]] = None) -> SynthReport:
    """Write images/NNNNNN.png, train/val/test.json, dataset_info.json (``<prefix>_train`` ...)
    and synth_config.json (the options, model input size and vocabulary fingerprint) to out_dir.

    ``only`` ({split: indices}) writes just those samples of those splits: a sample depends on
    (seed, index) alone, so a held-out split can be re-created without its whole dataset.
    Refuses a non-empty out_dir unless ``overwrite``, which removes only this generator's outputs.
    """
    from training.sharegpt import Sample, write_sharegpt

    t0 = time.perf_counter()
    syn = Synthesizer(cfg, vocab)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise SynthError(f"{out} is not empty (pass --overwrite to replace a previous synth output)")
        remove_outputs(out, OUTPUT_FILES)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    kinds: dict[str, int] = {}
    languages: dict[str, int] = {}
    counts: dict[str, int] = {}
    pool = None
    if workers > 1 and vocab is None:  # workers load the vocabulary themselves (cfg.vocab_path)
        import multiprocessing

        pool = multiprocessing.get_context("fork").Pool(workers, _init_worker, (cfg,))
    try:
        wanted = only if only is not None else syn.splits()
        for split in (split for split in SPLITS if split in wanted):
            rows: list[Sample] = []
            indices = wanted[split]
            encoded = (pool.imap(_encode_sample, indices, chunksize=64) if pool is not None
                       else (_encode(syn, i) for i in indices))
            for index, png_bytes, messages, kind, language in encoded:  # in index order: deterministic
                path = images / f"{index:06d}.png"
                path.write_bytes(png_bytes)
                rows.append(Sample(messages=messages, images=[path], source=f"synth:{index}"))
                kinds[kind] = kinds.get(kind, 0) + 1
                languages[language] = languages.get(language, 0) + 1
            write_sharegpt(out / f"{split}.json", rows, dataset_info_name=f"{cfg.name_prefix}_{split}")
            counts[split] = len(rows)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    meta = {
        "generator": "training.synth",
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "box_convention": cfg.boxes,
        "model_input_size": list(syn.model_input_size()) if cfg.boxes == "absolute_resized" else None,
        "vocabulary": {"version": syn.vocab.version, "fingerprint": syn.vocab.fingerprint()},
        "objects": syn.objects,
        "destinations": syn.containers,
        "skills": syn.skills,
        "counts": counts,
        "kinds": dict(sorted(kinds.items())),
        "languages": dict(sorted(languages.items())),
    }
    (out / "synth_config.json").write_text(json.dumps(meta, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return SynthReport(out, counts, kinds, languages, time.perf_counter() - t0)
