"""Toy vision tasks with verifiers, for learning PEPO/VPPO on a laptop, and JSONL datasets.

Every toy task draws its images with Pillow from a seeded `random.Random`, yields an
unlimited stream of examples and scores a completion with a verifier.

Answer format the policy learns: `<answer>ANSWER</answer>` (tasks that ask for a
chain of thought expect `<think>...</think><answer>ANSWER</answer>`).

Reward = accuracy + FORMAT_BONUS * format_ok. Accuracy is 1.0 for a correct answer
(continuous for tasks like grounding), format_ok is 1.0 when the completion is exactly
in the expected format with a non-empty answer. Adding a task takes one small class:
`sample`, a label pool for the format warm-up, and (optionally) its own `parse` / `accuracy`.

Real datasets: `JsonlTask(path)` reads ms-swift or EasyR1 JSONL and grades with `REWARDS` (mathruler).

    python tasks.py --list                                    # tasks, descriptions, blind baselines
    python tasks.py --export data/count --task count --n 1000 --format easyr1
"""

from __future__ import annotations

import argparse
import atexit
import functools
import importlib.util
import json
import random
import re
import select
import subprocess
import sys
import threading
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

FORMAT_BONUS = 0.1
IMAGE = "<image>"  # where an image goes in the prompt text
ANSWER_RE = re.compile(r"^\s*<answer>(.*?)</answer>\s*$", re.DOTALL)
THINK_ANSWER_RE = re.compile(r"^\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*$", re.DOTALL)


@dataclass
class Example:
    prompt: str  # user text; each "<image>" marks where one image goes
    images: list[Image.Image]
    answer: str  # ground truth, compared by the task's verifier
    meta: dict = field(default_factory=dict)


def extract_answer(completion: str) -> str | None:
    """The text inside a completion that is exactly `<answer>...</answer>`, else None."""
    m = ANSWER_RE.match(completion)
    return m.group(1).strip() if m else None


class Task:
    name = "task"
    description = "one line shown by --task list"
    labels: list[str] = []  # answer pool for the format warm-up (random labels)
    perception_region = "answer"  # where the perception words are written: "answer" or "think"
    warmup_steps = 60  # steps of the tiny model's format warm-up (pepo.build_tiny_model) on random_completion
    # The default run's pepo.py settings for this task (tiny model; flags given win): a constant 5e-4 reached
    # >= 0.9 on every preset and seed of `color` (results/presets.md), where 1e-3 sent runs into never-ending
    # completions and cosine decay left the last colour unlearned (README, Results).
    budget = dict(steps=100, lr=5e-4, lr_schedule="constant", temperature=1.0)
    pretrain_task = (
        None  # a *different* task whose correct answers the warm-up also trains on (perception pre-training)
    )

    def sample(self, rng: random.Random) -> Example:
        raise NotImplementedError

    def random_completion(self, rng: random.Random) -> str:
        """A well-formatted completion with a random label: what the format warm-up teaches."""
        return f"<answer>{rng.choice(self.labels)}</answer>"

    def correct_completion(self, example: Example) -> str:
        """A correct completion: what perception pre-training (pretrain_task) teaches."""
        return f"<answer>{example.answer}</answer>"

    def parse(self, completion: str) -> str | None:
        """The answer of a well-formatted completion; None means the format is wrong."""
        return extract_answer(completion)

    def accuracy(self, answer: str | None, example: Example) -> float:
        return float(answer is not None and answer.strip().lower() == example.answer.strip().lower())

    def score(self, completion: str, example: Example) -> tuple[float, float]:
        """(reward, accuracy) of one completion."""
        answer = self.parse(completion)
        acc = self.accuracy(answer, example)
        # No bonus for an empty answer: `<answer></answer>`, the shortest well-formed completion, is a
        # collapse GRPO fell into (reward 0.1 on every rollout, so no signal was left to learn from).
        return acc + FORMAT_BONUS * float(bool(answer)), acc

    def perception_words(self, example: Example) -> set[str]:
        """Ground truth from the generator: the words of a correct completion that are read off
        the image (a colour, a count), written inside `perception_region`. Empty: no labels."""
        return set()

    def perception_mask(self, token_strings: list[str], example: Example) -> list[bool]:
        """Which completion tokens spell this example's perception words (see perception_token_mask)."""
        return perception_token_mask(token_strings, self.perception_words(example), self.perception_region)


# ----------------------------------------------------------------------------------------
# Token labels: which completion tokens are perception tokens
# ----------------------------------------------------------------------------------------
def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-in for each byte (GPT-2 style: printable bytes stand for
    themselves, the others, space and newline among them, move to chr(256 + k)) -> that byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    moved = [b for b in range(256) if b not in keep]
    return {**{chr(b): b for b in keep}, **{chr(256 + k): b for k, b in enumerate(moved)}}


BYTE_LEVEL = _byte_level_alphabet()


def token_text(piece: str) -> str:
    """The text of one token: a byte-level BPE piece ('Ġred' -> ' red') or text as it is (' red',
    '<think>'). A piece made only of byte-level stand-ins is decoded; anything else is text."""
    if piece and all(ch in BYTE_LEVEL for ch in piece):
        return bytes(BYTE_LEVEL[ch] for ch in piece).decode("utf-8", errors="replace")
    return piece


def perception_token_mask(token_strings: list[str], words, region: str = "think") -> list[bool]:
    """Marks the tokens of a completion that spell one of `words` inside `region`.

    token_strings: the completion's tokens, as byte-level BPE pieces (tokenizer.convert_ids_to_tokens:
                   'Ġred') or as decoded text per token (' red'); special tokens as they are.
    words:         the perception words (Task.perception_words); matched whole-word, ignoring case.
    region:        "think": inside the first <think>...</think>; "answer": inside the first
                   <answer>...</answer>; "all": anywhere. An unclosed tag runs to the end.
    returns:       one bool per token: True where the token holds a character of a matched word.

    A word split over several tokens ('yel', 'low') marks each of them; a token that only adds
    the space before it ('Ġ' in 'Ġ', 'yellow') does not. Ground-truth words mark nothing where the
    policy wrote another colour; pass every candidate (e.g. set(COLORS)) to mark the slot instead.
    """
    texts = [token_text(t) for t in token_strings]
    starts, pos = [], 0
    for t in texts:
        starts.append(pos)
        pos += len(t)
    full = "".join(texts)
    lo, hi = 0, len(full)
    if region != "all":
        if region not in ("think", "answer"):
            raise ValueError(f"unknown region {region!r}; choose think, answer or all")
        open_tag, close_tag = f"<{region}>", f"</{region}>"
        i = full.find(open_tag)
        if i < 0:
            return [False] * len(texts)
        lo = i + len(open_tag)
        j = full.find(close_tag, lo)
        hi = j if j >= 0 else len(full)
    spans = []
    for w in {w.strip() for w in words if w.strip()}:
        pattern = r"(?<![A-Za-z0-9])" + re.escape(w) + r"(?![A-Za-z0-9])"
        spans += [m.span() for m in re.finditer(pattern, full[lo:hi], re.IGNORECASE)]
    return [any(s < lo + b and lo + a < s + len(t) for a, b in spans) for s, t in zip(starts, texts)]


# ----------------------------------------------------------------------------------------
# Drawing helpers. Features stay big (shapes >= 28 px, dots r = 7): the tiny model sees
# the 112x112 image as only 4x4 = 16 tokens.
# ----------------------------------------------------------------------------------------
COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230), "yellow": (235, 210, 40)}
SHAPES = ["circle", "square", "triangle"]
SIZE = 112  # pixels; the processor resizes to what the model sees
DOT_R = 7
FONT = ImageFont.load_default(size=22)  # Pillow's built-in font, large enough to span a patch


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    x1, y1, x2, y2 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x1 + x2) // 2, y1), (x1, y2), (x2, y2)], fill=fill)


def random_box(rng: random.Random, lo: int = 28, hi: int = 56) -> tuple[int, int, int, int]:
    s = rng.randint(lo, hi)
    x, y = rng.randint(0, SIZE - s), rng.randint(0, SIZE - s)
    return (x, y, x + s, y + s)


def blank() -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGB", (SIZE, SIZE), "white")
    return image, ImageDraw.Draw(image)


def shape_image(rng: random.Random, shape: str, box: tuple[int, int, int, int] | None = None) -> Image.Image:
    """One shape of a random colour, at `box` or a random place."""
    color = rng.choice(list(COLORS))
    image, draw = blank()
    draw_shape(draw, shape, box or random_box(rng), COLORS[color])
    return image


def place_dots(rng: random.Random, n: int) -> list[tuple[int, int]]:
    """n dot centres, a clear gap between any two so that every dot is countable."""
    centres: list[tuple[int, int]] = []
    while len(centres) < n:
        c = (rng.randint(DOT_R + 2, SIZE - DOT_R - 3), rng.randint(DOT_R + 2, SIZE - DOT_R - 3))
        if all((c[0] - x) ** 2 + (c[1] - y) ** 2 >= (2 * DOT_R + 6) ** 2 for x, y in centres):
            centres.append(c)
    return centres


def draw_dot(draw: ImageDraw.ImageDraw, centre: tuple[int, int], fill) -> None:
    x, y = centre
    draw.ellipse((x - DOT_R, y - DOT_R, x + DOT_R, y + DOT_R), fill=fill)


# ----------------------------------------------------------------------------------------
# Toy tasks
# ----------------------------------------------------------------------------------------
class ColorTask(Task):
    name = "color"
    description = "the colour of a single shape (red, green, blue or yellow)"
    labels = list(COLORS)

    def sample(self, rng):
        color, shape = rng.choice(self.labels), rng.choice(SHAPES)
        image = Image.new("RGB", (SIZE, SIZE), "white")
        # A large shape (48-84 px) puts its colour into most of the 16 image tokens: the default
        # task should be learnable by the tiny model within the 5-minute default run.
        draw_shape(ImageDraw.Draw(image), shape, random_box(rng, 48, 84), COLORS[color])
        prompt = f"{IMAGE}What colour is the shape? Answer as <answer>colour</answer>."
        return Example(prompt, [image], color)

    def perception_words(self, example):
        return {example.answer}  # the colour word


class ShapeTask(Task):
    name = "shape"
    description = "the kind of a single shape (circle, square or triangle)"
    labels = SHAPES

    def sample(self, rng):
        shape = rng.choice(self.labels)
        return Example(
            f"{IMAGE}What shape is this? Answer as <answer>shape</answer>.", [shape_image(rng, shape)], shape
        )

    def perception_words(self, example):
        return {example.answer}  # the shape word


class CountTask(Task):
    name = "count"
    description = "how many dots (1 to 6) of one colour"
    labels = [str(n) for n in range(1, 7)]

    def sample(self, rng):
        n, color = int(rng.choice(self.labels)), rng.choice(list(COLORS))
        image, draw = blank()
        for c in place_dots(rng, n):
            draw_dot(draw, c, COLORS[color])
        return Example(f"{IMAGE}How many dots are there? Answer as <answer>number</answer>.", [image], str(n))

    def perception_words(self, example):
        return {example.answer}  # the number


class PositionTask(Task):
    name = "position"
    description = "where the shape is: left, right, top or bottom (near the middle of that edge)"
    labels = ["left", "right", "top", "bottom"]

    def sample(self, rng):
        where, shape = rng.choice(self.labels), rng.choice(SHAPES)
        # Near the middle of one edge: the centre is >= 28 px from the image centre along
        # that edge's axis and <= 12 px off it across, so no example is ambiguous.
        s, edge, across = rng.randint(28, 32), rng.randint(2, 12), rng.randint(-12, 12)
        mid = (SIZE - s) // 2 + across
        x, y = {
            "left": (edge, mid),
            "right": (SIZE - s - edge, mid),
            "top": (mid, edge),
            "bottom": (mid, SIZE - s - edge),
        }[where]
        image = shape_image(rng, shape, (x, y, x + s, y + s))
        return Example(
            f"{IMAGE}Where is the shape? Answer as <answer>left, right, top or bottom</answer>.", [image], where
        )

    def perception_words(self, example):
        return {example.answer}  # the side


class CompareTask(Task):
    name = "compare"
    description = "geometry-lite: which of two labelled segments, A or B, is longer (>= 35% longer)"
    labels = ["A", "B"]

    def sample(self, rng):
        answer = rng.choice(self.labels)
        short = rng.randint(24, 52)
        long = min(round(short * rng.uniform(1.35, 1.8)), 80)  # the cap keeps the ratio >= 80/52 > 1.5
        lengths = {answer: long, "AB".replace(answer, ""): short}
        rows = rng.sample([24 + rng.randint(-4, 4), 84 + rng.randint(-4, 4)], 2)  # A's row is random: read the labels
        image, draw = blank()
        for label, y in zip("AB", rows):
            x = rng.randint(26, SIZE - 4 - lengths[label])
            draw.text((4, y - 13), label, fill="black", font=FONT)
            draw.line((x, y, x + lengths[label], y), fill=(30, 30, 30), width=5)
        prompt = f"{IMAGE}Which segment is longer, A or B? Answer as <answer>A</answer> or <answer>B</answer>."
        return Example(prompt, [image], answer, {"lengths": lengths, "rows": dict(zip("AB", rows))})

    def perception_words(self, example):
        return {example.answer}  # the letter of the longer segment, as seen


BOX_RE = re.compile(
    r"^\[\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*\]$"
)


@functools.lru_cache(maxsize=4096)  # the blind baseline parses the same candidate boxes many times
def parse_box(text: str) -> tuple[float, float, float, float] | None:
    """ "[x1,y1,x2,y2]" -> numbers, None if it is not a box."""
    m = BOX_RE.match(text.strip())
    return tuple(float(v) for v in m.groups()) if m else None


def box_iou(a, b) -> float:
    """Intersection over union of two [x1,y1,x2,y2] boxes; inverted boxes have zero area."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    area = lambda r: max(0.0, r[2] - r[0]) * max(0.0, r[3] - r[1])
    union = area(a) + area(b) - iw * ih
    return iw * ih / union if union > 0 else 0.0


class GroundingTask(Task):
    name = "grounding"
    description = "the shape's box [x1,y1,x2,y2] in pixels; reward is the IoU, correct when IoU >= 0.5"
    labels: list[str] = []  # answers are boxes: random_completion draws a random box instead

    def sample(self, rng):
        box = random_box(rng)
        image = shape_image(rng, rng.choice(SHAPES), box)
        prompt = f"{IMAGE}Where is the shape? Answer with its box in pixels as <answer>[x1,y1,x2,y2]</answer>."
        return Example(prompt, [image], "[{},{},{},{}]".format(*box), {"box": box})

    def perception_words(self, example):
        return {example.answer}  # the whole box

    def random_completion(self, rng):
        return "<answer>[{},{},{},{}]</answer>".format(*random_box(rng))

    def parse(self, completion):
        answer = extract_answer(completion)
        return answer if answer is not None and parse_box(answer) else None  # the format is a box

    def iou(self, answer: str | None, example: Example) -> float:
        box = parse_box(answer) if answer is not None else None
        return box_iou(box, parse_box(example.answer)) if box else 0.0

    def accuracy(self, answer, example):
        return float(self.iou(answer, example) >= 0.5)

    def score(self, completion, example):
        answer = self.parse(completion)
        iou = self.iou(answer, example)
        return iou + FORMAT_BONUS * float(answer is not None), float(iou >= 0.5)  # continuous reward


NAMES = ["dax", "wug", "blick", "fep", "toma", "zup"]  # made-up class names: only the prompt tells them


class FewShotTask(Task):
    name = "fewshot"
    description = "in-context: two shapes named with made-up words, then name a third image's shape"
    labels = NAMES

    def sample(self, rng):
        shapes, names = rng.sample(SHAPES, 2), rng.sample(NAMES, 2)
        k = rng.randrange(2)  # the query's class
        images = [shape_image(rng, s) for s in shapes + [shapes[k]]]
        prompt = (
            f"{IMAGE}This is a {names[0]}.\n{IMAGE}This is a {names[1]}.\n"
            f"{IMAGE}What is this? Answer as <answer>name</answer>."
        )
        return Example(prompt, images, names[k], {"shapes": shapes})


class ThinkTask(Task):
    """A chain-of-thought task: `<think>...</think><answer>...</answer>`, scored on the whole chain.
    A subclass says which <think> text is right for an example (`chain_ok`)."""

    perception_region = "think"

    def parse(self, completion):
        m = THINK_ANSWER_RE.match(completion)
        return m.group(2).strip() if m else None

    def chain_ok(self, think: str, example: Example) -> bool:
        """Whether `think` (the <think> text, lower case, runs of whitespace as one space) is right."""
        raise NotImplementedError

    def score(self, completion, example):
        """Correct only when the whole chain is: the <think> text passes chain_ok and the answer is the
        example's (case and spacing aside); the format bonus as in Task.score."""
        m = THINK_ANSWER_RE.match(completion)
        answer = m.group(2).strip() if m else None  # = self.parse(completion)
        think = " ".join(m.group(1).lower().split()) if m else ""
        right = answer is not None and answer.lower() == example.answer.lower() and self.chain_ok(think, example)
        return float(right) + FORMAT_BONUS * float(bool(answer)), float(right)


class DotsSumTask(ThinkTask):
    name = "dots-sum"
    description = "chain of thought: count red and blue dots, answer the sum as <think>..</think><answer>N</answer>"
    labels = [str(n) for n in range(2, 8)]

    def counts(self, rng: random.Random) -> tuple[int, int]:
        total = int(rng.choice(self.labels))  # the sum is uniform, so no answer is a free win
        red = rng.randint(1, total - 1)
        return red, total - red

    def sample(self, rng):
        red, blue = self.counts(rng)
        image, draw = blank()
        for i, c in enumerate(place_dots(rng, red + blue)):
            draw_dot(draw, c, COLORS["red"] if i < red else COLORS["blue"])
        prompt = (
            f"{IMAGE}Count the red dots and the blue dots. Answer as <think>r red, b blue</think><answer>sum</answer>."
        )
        return Example(prompt, [image], str(red + blue), {"red": red, "blue": blue})

    def random_completion(self, rng):
        red, blue = self.counts(rng)
        return f"<think>{red} red, {blue} blue</think><answer>{red + blue}</answer>"

    def correct_completion(self, example):
        return f"<think>{example.meta['red']} red, {example.meta['blue']} blue</think><answer>{example.answer}</answer>"

    def perception_words(self, example):
        return {str(example.meta["red"]), str(example.meta["blue"])}  # the two counts; the sum is reasoning

    def chain_ok(self, think, example):
        """<think> is `r red, b blue` with the image's two counts: a right sum after wrong counts scores 0."""
        counts = re.fullmatch(r"(\d+) red, (\d+) blue", think)
        return counts is not None and [int(c) for c in counts.groups()] == [example.meta["red"], example.meta["blue"]]


COLOR_NAMES = {"red": "dax", "green": "wug", "blue": "blick", "yellow": "fep"}  # the rule color-think states


class ColorThinkTask(ThinkTask):
    """Chain of thought on what the tiny model can see: read one shape's colour (perception),
    apply a rule that the prompt states (colour -> made-up name, reasoning), answer the name:

        <think>red shape, red is dax</think><answer>dax</answer>      12-13 tokens with the end token

    The rule is the same in every prompt and the colour is uniform, so the text alone gives
    chance (1/4). Correct = the whole chain: the shape's colour in <think>, the rule's name for it
    there and as the answer (score);
    reward = correct + the format bonus for the think/answer format.
    The format warm-up (random_completion) writes a *random* colour and the name that the rule
    gives for it: it teaches the format and the rule but never a correct reading of this task's
    image, so RL has to learn one thing, the colour token inside <think>: the perception token.
    What a VLM brings to RL, the warm-up adds as perception pre-training on another task
    (pretrain_task = `color`: colour words after another prompt). Without it GRPO stayed near
    chance (greedy held-out 0.27 and 0.50 after 80 steps, 2 seeds, in an earlier version).
    The colour comes first in <think>, where each colour is a single token of the tiny tokenizer
    ('red', 'green', ...; after a space 'green' and 'yellow' would take two, see TOKENIZER_TASKS).
    """

    name = "color-think"
    description = (
        "chain of thought: <think>C shape, C is N</think><answer>N</answer>: the name N of the colour C by a stated "
        "rule"
    )
    labels = list(COLOR_NAMES.values())
    warmup_steps = 200  # the rule (copy the colour, name it) takes ~150 steps to learn; the format alone takes 60
    # At `color`'s budget one colour's reading in <think> locked onto another colour's word in 9 of 25 default
    # runs; at half the rate for 1.5x the steps in 2 of 25; sampling at 1.2 as well, in 1 of 25
    # (results/presets_color-think.md, README).
    budget = dict(steps=150, lr=2.5e-4, lr_schedule="constant", temperature=1.2)
    pretrain_task = (
        "color"  # what a VLM knows before RL: colour words, read off a shape (a different prompt and answer)
    )
    # A large shape, as in `color`: its colour fills most of the 16 image tokens.
    PROMPT = (
        f"{IMAGE}Colour names: "
        + ", ".join(f"{c} is {n}" for c, n in COLOR_NAMES.items())
        + ". Name the shape's colour. Answer as <think>colour shape, colour is name</think><answer>name</answer>."
    )

    @staticmethod
    def completion(color: str) -> str:
        return f"<think>{color} shape, {color} is {COLOR_NAMES[color]}</think><answer>{COLOR_NAMES[color]}</answer>"

    def sample(self, rng):
        color, shape = rng.choice(list(COLOR_NAMES)), rng.choice(SHAPES)
        image, draw = blank()
        draw_shape(draw, shape, random_box(rng, 48, 84), COLORS[color])
        return Example(self.PROMPT, [image], COLOR_NAMES[color], {"color": color, "shape": shape})

    def random_completion(self, rng):
        return self.completion(rng.choice(list(COLOR_NAMES)))

    def correct_completion(self, example):
        return self.completion(example.meta["color"])

    def chain_ok(self, think, example):
        """<think> is `C shape, C is N` with C the shape's colour and N the name the rule gives C.
        Checked on the answer alone, GRPO found a shortcut: one fixed colour in <think> for every
        image, then the image read at the answer (0.30 -> 0.74, then stuck); checked on the first
        colour alone, a broken chain (`yellow shape, yellow is dax` -> `fep`) scored as correct."""
        color = example.meta["color"]
        return think == f"{color} shape, {color} is {COLOR_NAMES[color]}"

    def perception_words(self, example):
        return {example.meta["color"]}


TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        ColorTask(),
        ShapeTask(),
        CountTask(),
        PositionTask(),
        CompareTask(),
        GroundingTask(),
        FewShotTask(),
        DotsSumTask(),
        ColorThinkTask(),
    ]
}


def get_task(name: str) -> Task:
    """A toy task by name, or a dataset when `name` is a path ending in .jsonl."""
    if name.endswith(".jsonl"):
        return JsonlTask(name)
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)} or a .jsonl file")
    return TASKS[name]


# The tiny model's tokenizer (pepo.build_tiny_model) is trained on these tasks' text only, so that
# adding a task never changes the tokenizer, and with it every tiny run's numbers. Later tasks
# write with words already in it (a word outside it is spelled in smaller pieces, which also works).
TOKENIZER_TASKS = ("color", "shape", "count", "position", "compare", "grounding", "fewshot", "dots-sum")


def tokenizer_corpus(n_per_task: int = 20, seed: int = 0) -> list[str]:
    """Text the built-in tiny tokenizer is trained on: prompts and answers of TOKENIZER_TASKS."""
    rng = random.Random(seed)
    texts = []
    for task in (TASKS[name] for name in TOKENIZER_TASKS):
        for _ in range(n_per_task):
            texts += [task.sample(rng).prompt.replace(IMAGE, ""), task.random_completion(rng)]
    return texts


def blind_baseline(task: Task, n: int = 500, seed: int = 0) -> float:
    """Accuracy of the best constant answer (the majority answer, judged by the task's own
    `accuracy`): what a policy can reach without looking at the images."""
    rng = random.Random(seed)
    examples = [task.sample(rng) for _ in range(n)]
    candidates = dict.fromkeys(ex.answer for ex in examples)
    return max(sum(task.accuracy(c, ex) for ex in examples) / n for c in candidates)


def answer_budget(task: Task, tokenizer, n: int = 200) -> int:
    """Tokens that the longest well-formatted answer of `task` takes, end token included: with a
    smaller --max-new-tokens some answers can never be given in full."""
    rng = random.Random(0)
    texts = {task.random_completion(rng) for _ in range(n)} | {f"<answer>{label}</answer>" for label in task.labels}
    return 1 + max(len(ids) for ids in tokenizer(sorted(texts), add_special_tokens=False).input_ids)


# ----------------------------------------------------------------------------------------
# Rewards for real datasets (--reward): the authors' and the project's, graded by mathruler
# ----------------------------------------------------------------------------------------
ANSWER_ANYWHERE_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
THINK_ANYWHERE_RE = re.compile(r"<think>.*?</think>", re.DOTALL)
VPPO_FORMAT_RE = re.compile(r"<think>.*</think>.*\\boxed\{.*\}.*", re.DOTALL)
TEXT_RE = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")
CHOICE_RE = re.compile(r"^\(?([a-e])\)?(?:[.):\s]|$)", re.IGNORECASE)
LATEX_NOISE = ["\\left", "\\right", "\\!", "\\,", "\\;", "^{\\circ}", "^\\circ", "°", "$"]
MATHRULER = ("mathruler", "sympy", "pylatexenc")  # mathruler's wheel declares neither of its two dependencies


def mathruler_missing() -> str | None:
    """The first of mathruler and its dependencies that is not installed, else None (nothing is imported)."""
    return next((m for m in MATHRULER if importlib.util.find_spec(m) is None), None)


def grade_answer(given: str, truth: str) -> bool:
    """mathruler.grader.grade_answer, the grader both authors use; imported on first use (sympy is slow to import).
    Not symmetric: an integer `truth` needs an integer `given`, fractions must be reduced alike."""
    from mathruler.grader import grade_answer

    return grade_answer(given, truth)


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}, nested braces included; None if none is closed."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth = 0
    for i in range(start + len("\\boxed"), len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start + len("\\boxed{") : i]
    return None


def final_answer(completion: str) -> str | None:
    """The last <answer>...</answer> (or a \\boxed{} inside it), else the last \\boxed{}; None if neither."""
    tagged = ANSWER_ANYWHERE_RE.findall(completion)
    boxed = last_boxed(tagged[-1] if tagged else completion)
    if boxed is not None:
        return boxed.strip()
    return tagged[-1].strip() if tagged else None


def unwrap(s: str) -> str:
    """Without \\text{}-like wrappers, $, \\left/\\right, LaTeX spacing and degree marks."""
    s = TEXT_RE.sub(r"\1", s)
    for noise in LATEX_NOISE:
        s = s.replace(noise, "")
    return s.strip()


def choice_letter(s: str) -> str | None:
    """ "B", "(B)", "B.", "B) 12" -> "b"."""
    m = CHOICE_RE.match(unwrap(s))
    return m.group(1).lower() if m else None


def jsonl_reward(completion: str, answer: str) -> tuple[float, float]:
    """--reward jsonl, the project's: the final answer (final_answer: <answer> or \\boxed{}); a
    choice A-E is compared by letter, anything else by grade_answer(answer given, truth) after
    unwrap(); reward = accuracy + FORMAT_BONUS when there is a non-empty answer, as for toy tasks."""
    given = final_answer(completion)
    if not given:
        return 0.0, 0.0
    truth = unwrap(answer)
    if re.fullmatch(r"\(?[A-Ea-e]\)?\.?", truth):  # multiple choice: "B", "(B)", "B."
        acc = float(choice_letter(given) == truth.strip("().").lower())
    else:
        acc = float(grade_answer(unwrap(given), truth))
    return acc + FORMAT_BONUS, acc


def pepo_normalize(text: str) -> str:
    """PEPO's answer normalisation: NFKC, casefold, whitespace runs -> one space, trimmed, one
    trailing "." or "。" dropped, and π written \\pi."""
    text = re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text).casefold()).strip()
    if text.endswith((".", "。")):
        text = text[:-1].strip()
    return text.replace("π", "\\pi")


def pepo_reward(completion: str, answer: str) -> tuple[float, float]:
    """--reward pepo: PEPO's ms-swift reward plugin, format + accuracy with weights 1 and 1.
    format = 1 when the completion holds exactly one <think>...</think> and exactly one
    <answer>...</answer> (counted anywhere; order and surrounding text are free). accuracy = the
    first <answer>'s content against the truth, both pepo_normalize'd, graded with the truth as
    mathruler's *given* argument (their order); a grader error scores 0, as in their code."""
    fmt = float(len(THINK_ANYWHERE_RE.findall(completion)) == 1 and len(ANSWER_ANYWHERE_RE.findall(completion)) == 1)
    m = ANSWER_ANYWHERE_RE.search(completion)
    try:
        acc = float(m is not None and grade_answer(pepo_normalize(answer), pepo_normalize(m.group(1).strip())))
    except Exception:
        acc = 0.0
    return fmt + acc, acc


def vppo_parts(completion: str, answer: str) -> tuple[float, float]:
    """(accuracy, format) of VPPO's math reward (EasyR1's examples/reward_function/math.py).
    Whitespace around "<", ">" and "/" is removed from the whole completion first (their fix for
    Qwen2.5-VL-32B's "< think >"); accuracy grades the last \\boxed{} (mathruler's
    extract_boxed_content: the string "None" when there is none) against the truth; format = the
    completion is fully <think>...</think>...\\boxed{...}... (greedy, across lines)."""
    from mathruler.grader import extract_boxed_content

    text = re.sub(r"\s*(<|>|/)\s*", r"\1", completion)
    return float(grade_answer(extract_boxed_content(text), answer)), float(VPPO_FORMAT_RE.fullmatch(text) is not None)


def vppo_reward(completion: str, answer: str) -> tuple[float, float]:
    """--reward vppo: accuracy only (their compute_score_wo_format, the reward of VPPO's scripts)."""
    acc, _ = vppo_parts(completion, answer)
    return acc, acc


def vppo_format_reward(completion: str, answer: str) -> tuple[float, float]:
    """--reward vppo-format: 0.9 * accuracy + 0.1 * format (their compute_score, format_weight 0.1)."""
    acc, fmt = vppo_parts(completion, answer)
    return (1 - 0.1) * acc + 0.1 * fmt, acc


# name -> function(completion, answer) -> (reward, accuracy). Plain functions; runs grade them
# through GRADER, which bounds each call in time and input length.
REWARDS = {"jsonl": jsonl_reward, "pepo": pepo_reward, "vppo": vppo_reward, "vppo-format": vppo_format_reward}

# --format-prompt NAME: appended to each --data prompt as EasyR1 does (apply_format_prompt).
FORMAT_PROMPTS = {
    # VPPO's examples/format_prompt/math_format_perception.jinja (their paper's appendix N, the same text)
    "vppo": "You first think through the reasoning process as an internal monologue, enclosed within "
    "<think> </think> tags. Then, provide your final answer enclosed within \\boxed{}.",
}


def apply_format_prompt(prompt: str, format_prompt: str | None) -> str:
    """EasyR1's rendering of `{{ content | trim }}\\n\\n<instruction>`: the prompt trimmed, a blank
    line, the instruction (a FORMAT_PROMPTS name or the text itself). None leaves the prompt as is."""
    if format_prompt is None:
        return prompt
    return prompt.strip() + "\n\n" + FORMAT_PROMPTS.get(format_prompt, format_prompt).strip()


GRADE_SECONDS = 5.0  # time bound of one grading call; mathruler takes milliseconds on real answers
GRADE_MAX_CHARS = 100_000  # longer inputs are not graded: ~3x an 8,192-token completion


def grade_worker() -> None:
    """Grader's child process: reads [name, completion, answer] as one JSON line, writes
    [reward, accuracy] (or an error string) as one JSON line, until its stdin closes."""
    import mathruler.grader  # noqa: F401  (imported before "ready": the time bound covers grading alone)

    out, sys.stdout = sys.stdout, sys.stderr  # nothing the graders print can break the protocol
    out.write('"ready"\n')
    out.flush()
    for line in sys.stdin:
        name, completion, answer = json.loads(line)
        try:
            reply = list(REWARDS[name](completion, answer))
        except Exception as e:  # e.g. VPPO's code has no guard around the grader
            reply = f"{type(e).__name__}: {e}"[:200]
        out.write(json.dumps(reply) + "\n")
        out.flush()


class Grader:
    """Runs REWARDS[name](completion, answer) in a persistent child process, bounded in time and
    input length: model output is untrusted, and sympy (under mathruler) can hang on some
    expressions. A call over `seconds` kills the child (the next call starts a new one); it, a
    call that raises or crashes the child, and an input over `max_chars` score (0, 0) and add 1 to
    `failures`. A child process (not signal.alarm, which only works in the main thread) works in
    any thread and on every torchrun rank (each has its own child); a lock keeps calls in order."""

    def __init__(self, seconds: float = GRADE_SECONDS, max_chars: int = GRADE_MAX_CHARS):
        self.seconds, self.max_chars, self.failures = seconds, max_chars, 0
        self.proc, self.lock = None, threading.Lock()
        atexit.register(self.stop)

    def start(self) -> None:
        here = str(Path(__file__).resolve().parent)
        code = f"import sys; sys.path.insert(0, {here!r}); import tasks; tasks.grade_worker()"
        # Its own session: a Ctrl-C meant for the run does not kill it mid-call. It exits when its stdin closes.
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        if self.read(60.0) != "ready":  # importing sympy takes a second or two
            self.stop()
            raise RuntimeError("the grading process did not start; run: python -c 'import mathruler.grader'")

    def read(self, seconds: float):
        """The child's next reply, or None when it gave none within `seconds` or died."""
        if not select.select([self.proc.stdout], [], [], seconds)[0]:
            return None
        line = self.proc.stdout.readline()
        return json.loads(line) if line else None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc.stdin.close()  # no pipe left open for the garbage collector to warn about
            self.proc.stdout.close()
            self.proc = None

    def __call__(self, name: str, completion: str, answer: str) -> tuple[float, float]:
        with self.lock:
            if len(completion) <= self.max_chars and len(answer) <= self.max_chars:
                if self.proc is None or self.proc.poll() is not None:
                    self.stop()  # a child that died: reap it and close its pipes
                    self.start()
                try:
                    self.proc.stdin.write(json.dumps([name, completion, answer]) + "\n")
                    self.proc.stdin.flush()
                    reply = self.read(self.seconds)
                except BrokenPipeError:  # the child died between calls
                    reply = None
                if isinstance(reply, list):
                    return reply[0], reply[1]
                if reply is None:  # hung (or died): a fresh child for the next call
                    self.stop()
            self.failures += 1
            return 0.0, 0.0

    def pop_failures(self) -> int:
        """Failures since the last call (the per-step grade_failures in metrics.jsonl)."""
        with self.lock:
            n, self.failures = self.failures, 0
            return n


GRADER = Grader()  # the process's one grader (started on first use)


# ----------------------------------------------------------------------------------------
# JSONL datasets: ms-swift {"messages", "images", "solution"} or EasyR1 {"problem", "answer", "images"}
# ----------------------------------------------------------------------------------------
class DatasetError(ValueError):
    """A dataset that cannot be used; the one-line message names the file, line and problem."""


def message_text(content) -> str | None:
    """A chat message's text; list content (OpenAI style parts) gets "<image>" per image part."""
    if isinstance(content, str) or content is None:
        return content
    return "".join(p.get("text", "") if p.get("type") == "text" else IMAGE for p in content if isinstance(p, dict))


def read_row(line: str, where: str, root: Path, seen: set) -> dict:
    """Validate one JSONL line into a light row {prompt, images (paths), answer, where}."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{where}: not valid JSON ({e.msg}); write one JSON object per line") from None
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: a row must be a JSON object; write one JSON object per line")
    if "messages" in row:  # ms-swift: the (last) user message is the prompt; an assistant message is ignored
        users = [m for m in row["messages"] if isinstance(m, dict) and m.get("role") == "user"]
        prompt = message_text(users[-1].get("content")) if users else None
    else:
        prompt = row.get("problem")
    if not isinstance(prompt, str):
        raise DatasetError(f"{where}: no prompt; add a user message ('messages') or a 'problem' field")
    answer = row.get("solution", row.get("answer"))
    if answer is None or not str(answer).strip():
        raise DatasetError(f"{where}: no answer field; add the ground truth as 'solution' or 'answer'")
    images = row.get("images")
    images = [images] if isinstance(images, (str, dict)) else images
    if not images or not isinstance(images, list):
        raise DatasetError(f"{where}: no image field; add 'images', a list of image paths")
    paths = []
    for im in images:
        p = im.get("path") if isinstance(im, dict) else im
        if not isinstance(p, str):
            raise DatasetError(f"{where}: an image entry is not a path: {im!r}"[:200])
        path = Path(p) if Path(p).is_absolute() else root / p
        if path not in seen:
            if not path.is_file():
                raise DatasetError(f"{where}: image not found: {path}; fix the path or set --image-root")
            try:
                with Image.open(path) as im:  # header, and for PNG the chunk checksums: no pixels are decoded
                    im.verify()
            except Exception as e:
                raise DatasetError(
                    f"{where}: not a readable image: {path} ({str(e) or type(e).__name__}); replace or drop it"
                ) from None
            seen.add(path)
        paths.append(str(path))
    marks = prompt.count(IMAGE)
    if marks == 0:
        prompt = IMAGE * len(paths) + prompt
    elif marks != len(paths):
        raise DatasetError(
            f"{where}: the prompt has {marks} '<image>' marks but the row has {len(paths)} images; "
            "use one mark per image, or none"
        )
    answer = str(answer)
    return {"prompt": prompt, "images": paths, "answer": final_answer(answer) or answer.strip(), "where": where}


class JsonlTask(Task):
    """A JSONL dataset as a task. Every row is validated up front (images by header and, for PNG,
    checksums); rows stay light dicts and images are decoded when a row is sampled, where a
    file that still fails (e.g. a truncated JPEG) raises DatasetError with its row and path.
    Completions are scored by REWARDS[reward] through GRADER; `format_prompt` (a FORMAT_PROMPTS
    name or text) is appended to every prompt by apply_format_prompt."""

    budget = dict(steps=100, lr=1e-3, lr_schedule="cosine", temperature=1.0)  # --data: settings before toy budgets

    def __init__(
        self,
        path: str | Path,
        image_root: str | Path | None = None,
        reward: str = "jsonl",
        format_prompt: str | None = None,
    ):
        if reward not in REWARDS:
            raise ValueError(f"unknown reward {reward!r}; choose from {', '.join(REWARDS)}")
        self.reward, self.format_prompt = reward, format_prompt
        path = Path(path)
        self.name, self.description = path.name, f"JSONL dataset {path}"
        if not path.is_file():
            raise DatasetError(
                f"{path}: {'a folder' if path.is_dir() else 'file not found'}; pass a JSONL file (--data)"
            )
        root = Path(image_root) if image_root is not None else path.parent
        self.rows, seen = [], set()
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    self.rows.append(read_row(line, f"{path}:{n}", root, seen))
        if not self.rows:
            raise DatasetError(
                f"{path}: empty file, no rows; write one JSON object per line "
                "(python tasks.py --export shows the format)"
            )
        self.labels = sorted({r["answer"] for r in self.rows})

    def sample(self, rng):
        row = rng.choice(self.rows)
        images = []
        for p in row["images"]:
            try:
                with Image.open(p) as im:
                    images.append(im.convert("RGB"))
            except OSError as e:
                raise DatasetError(f"{row['where']}: not a readable image: {p} ({e}); replace or drop it") from None
        prompt = apply_format_prompt(row["prompt"], self.format_prompt)
        return Example(prompt, images, row["answer"], {"where": row["where"]})

    def score(self, completion, example):
        return GRADER(self.reward, completion, example.answer)  # REWARDS[self.reward], bounded


def export(task: Task, out_dir: str | Path, n: int, fmt: str = "swift", seed: int = 0) -> Path:
    """Write n examples of `task` as out_dir/data.jsonl (relative image paths) + out_dir/images/*.png."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    with open(out / "data.jsonl", "w", encoding="utf-8") as f:
        for i in range(n):
            ex = task.sample(rng)
            images = [f"images/{i:06d}_{j}.png" for j in range(len(ex.images))]
            for im, rel in zip(ex.images, images):
                im.save(out / rel)
            if fmt == "swift":
                row = {"images": images, "messages": [{"role": "user", "content": ex.prompt}], "solution": ex.answer}
            else:
                row = {"problem": ex.prompt, "answer": ex.answer, "images": images}
            f.write(json.dumps(row) + "\n")
    return out / "data.jsonl"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="List the toy tasks, or export one as a JSONL dataset.")
    p.add_argument("--list", action="store_true", help="print every task, its description and its blind baseline")
    p.add_argument("--export", metavar="DIR", help="write DIR/data.jsonl and DIR/images/*.png")
    p.add_argument("--task", default="color", choices=list(TASKS), help="toy task to export")
    p.add_argument("--n", type=int, default=100, help="number of examples to export")
    p.add_argument(
        "--format",
        default="swift",
        choices=["swift", "easyr1"],
        help="swift: {images, messages, solution}; easyr1: {problem, answer, images}",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the example stream")
    args = p.parse_args(argv)
    if args.list:
        print(f"{'task':10s} {'classes':>7s} {'blind':>6s}  description")
        for t in TASKS.values():
            print(f"{t.name:10s} {len(t.labels) or '-':>7} {blind_baseline(t):6.3f}  {t.description}")
    elif args.export:
        path = export(TASKS[args.task], args.export, args.n, args.format, args.seed)
        print(f"wrote {args.n} {args.task} examples to {path}")
    else:
        p.print_help()


if __name__ == "__main__":
    main()
