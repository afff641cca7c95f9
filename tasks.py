"""Toy vision tasks with verifiers, for learning PEPO/VPPO on a laptop.

Every task draws its images with Pillow from a seeded `random.Random`, yields an
unlimited stream of examples and scores a completion with a verifier.

Answer format the policy learns: `<answer>ANSWER</answer>` (tasks that ask for a
chain of thought expect `<think>...</think><answer>ANSWER</answer>`).

Reward = accuracy + FORMAT_BONUS * format_ok. Accuracy is 1.0 for a correct answer
(continuous for tasks like grounding), format_ok is 1.0 when the completion is exactly
in the expected format. Adding a task takes one small class: `sample`, a label pool
for the format warm-up, and (optionally) its own `accuracy`.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

FORMAT_BONUS = 0.1
IMAGE = "<image>"  # where an image goes in the prompt text
ANSWER_RE = re.compile(r"^\s*<answer>(.*?)</answer>\s*$", re.DOTALL)


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
    labels: list[str] = []  # answer pool for the format warm-up (random labels) and blind baseline

    def sample(self, rng: random.Random) -> Example:
        raise NotImplementedError

    def random_completion(self, rng: random.Random) -> str:
        """A well-formatted completion with a random label: what the format warm-up teaches."""
        return f"<answer>{rng.choice(self.labels)}</answer>"

    def accuracy(self, answer: str | None, example: Example) -> float:
        return float(answer is not None and answer.lower() == example.answer.lower())

    def score(self, completion: str, example: Example) -> tuple[float, float]:
        """(reward, accuracy) of one completion."""
        answer = extract_answer(completion)
        acc = self.accuracy(answer, example)
        return acc + FORMAT_BONUS * float(answer is not None), acc


COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230), "yellow": (235, 210, 40)}
SHAPES = ["circle", "square", "triangle"]
SIZE = 112  # pixels; the processor resizes to what the model sees


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


class ColorTask(Task):
    name = "color"
    description = "the colour of a single shape (red, green, blue or yellow)"
    labels = list(COLORS)

    def sample(self, rng):
        color, shape = rng.choice(self.labels), rng.choice(SHAPES)
        image = Image.new("RGB", (SIZE, SIZE), "white")
        draw_shape(ImageDraw.Draw(image), shape, random_box(rng), COLORS[color])
        prompt = f"{IMAGE}What colour is the shape? Answer as <answer>colour</answer>."
        return Example(prompt, [image], color)


TASKS: dict[str, Task] = {t.name: t for t in [ColorTask()]}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    return TASKS[name]


def tokenizer_corpus(n_per_task: int = 20, seed: int = 0) -> list[str]:
    """Text the built-in tiny tokenizer is trained on: prompts and answers of every task."""
    rng = random.Random(seed)
    texts = []
    for task in TASKS.values():
        for _ in range(n_per_task):
            texts += [task.sample(rng).prompt.replace(IMAGE, ""), task.random_completion(rng)]
    return texts
