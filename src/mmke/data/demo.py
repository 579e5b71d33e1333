"""Synthetic E-VQA / E-IC datasets, so the whole workflow runs offline on a laptop.

Images are coloured shapes drawn with PIL; questions, captions and counterfactual targets follow
from the drawn scene, so ``pred`` is the true answer and ``alt`` a different one. Output is a
pure function of the arguments (seeded ``random.Random``, PNGs without timestamps): Snakemake
can rebuild it and get byte-identical files.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image, ImageDraw

from mmke.io import atomic_write, write_json

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
           "yellow": (235, 210, 40), "purple": (140, 60, 180), "orange": (240, 140, 30)}
BACKGROUNDS = {"grey": (128, 128, 128), "white": (240, 240, 240), "black": (25, 25, 25)}
SHAPES = ("circle", "square", "triangle")
NUMBERS = ("one", "two", "three", "four")

# (question, rephrasings, scene attribute asked about, its vocabulary)
VQA_QUESTIONS = (
    ("What colour is the shape?",
     ("Which colour does the shape in the picture have?", "What is the colour of the object shown?"),
     "colour", tuple(COLOURS)),
    ("What shape is shown in the image?",
     ("Which geometric figure appears in this picture?", "What kind of shape can be seen here?"),
     "shape", SHAPES),
    ("What colour is the background?",
     ("Which colour is the area behind the shape?", "What is the colour of the backdrop?"),
     "background", tuple(BACKGROUNDS)),
)
CAPTION_PROMPT = "a photo of"
CAPTION_REPHRASES = ("an image of", "a picture showing", "a snapshot of")
COUNT_QUESTIONS = ("How many shapes are in the picture?", "How many objects can you count in this image?")
# Invented facts, so a text-locality answer never depends on what a pretrained model knows.
FACTS = (
    ("What is the capital of Veltria?", "Norhaven"),
    ("Who wrote the novel The Glass Orchard?", "Ilsa Marrow"),
    ("Which river flows through Castor Bay?", "the Pellin"),
    ("What is the national bird of Ostrava Minor?", "the grey heron"),
    ("In which year was the Tarsel Bridge opened?", "1887"),
    ("What currency is used in the Quorran Isles?", "the quill"),
    ("Who painted Morning over Lake Venn?", "Adra Kestel"),
    ("What is the highest mountain in Drelland?", "Mount Harrow"),
    ("Which instrument did Tomas Brevik play?", "the cello"),
    ("What language is spoken in Sorvania?", "Sorvan"),
    ("Who founded the city of Elmstead?", "Corwin Hale"),
    ("What is the main export of Pallas Reach?", "copper"),
)

Shape = tuple[str, tuple[int, int, int], tuple[int, int, int, int]]  # name, fill, box


@dataclass(frozen=True)
class _Scene:
    shape: str
    colour: str
    background: str


def write_demo_dataset(out_dir: str | os.PathLike, kind: str, n_train: int = 24, n_eval: int = 24,
                       seed: int = 0, image_size: int = 64) -> dict[str, Path]:
    """Write ``train.json``, ``eval.json`` and ``images/`` under ``out_dir``.

    Image fields are relative to ``out_dir/images``, the image root (and rephrase root) for
    loading: the workflow declares that folder as the stage's output and later stages' input.
    Returns the paths under the keys ``train``, ``eval`` and ``images``.
    """
    if kind not in ("evqa", "eic"):
        raise ValueError(f"unknown dataset kind {kind!r}; valid: evqa, eic")
    if n_train < 0 or n_eval < 0:
        raise ValueError(f"record counts must be >= 0, got n_train={n_train}, n_eval={n_eval}")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16 to draw distinguishable shapes, got {image_size}")
    out = Path(out_dir)
    paths = {"train": out / "train.json", "eval": out / "eval.json", "images": out / "images"}
    for split, n in (("train", n_train), ("eval", n_eval)):
        # One generator per split: changing n_eval leaves the training set untouched.
        rng = random.Random(f"{kind}:{split}:{seed}")
        rows = [_record(rng, paths["images"], f"{split}/{i:05d}", kind, image_size) for i in range(n)]
        write_json(paths[split], rows)
    return paths


def _record(rng: random.Random, root: Path, stem: str, kind: str, size: int) -> dict[str, str]:
    scene = _Scene(rng.choice(SHAPES), rng.choice(tuple(COLOURS)), rng.choice(tuple(BACKGROUNDS)))
    image, image_rephrase, m_loc = f"{stem}.png", f"{stem}_rephrase.png", f"{stem}_mloc.png"
    # Same scene twice with fresh position, size and background shade: the image-generality pair.
    _save(root / image, _draw_scene(rng, scene, size))
    _save(root / image_rephrase, _draw_scene(rng, scene, size))
    count = rng.randint(1, len(NUMBERS))
    _save(root / m_loc, _draw_many(rng, count, size))
    loc, loc_ans = rng.choice(FACTS)
    row = {"image": image, "image_rephrase": image_rephrase, "loc": loc, "loc_ans": loc_ans,
           "m_loc": m_loc, "m_loc_q": rng.choice(COUNT_QUESTIONS), "m_loc_a": NUMBERS[count - 1]}
    if kind == "evqa":
        question, rephrasings, attribute, vocabulary = rng.choice(VQA_QUESTIONS)
        truth = getattr(scene, attribute)
        alt = rng.choice([v for v in vocabulary if v != truth])
        row |= {"src": question, "rephrase": rng.choice(rephrasings), "pred": truth, "alt": alt}
    else:
        attribute, vocabulary = rng.choice((("colour", tuple(COLOURS)), ("shape", SHAPES)))
        changed = {attribute: rng.choice([v for v in vocabulary if v != getattr(scene, attribute)])}
        row |= {"src": CAPTION_PROMPT, "rephrase": rng.choice(CAPTION_REPHRASES),
                "pred": _caption(scene), "alt": _caption(replace(scene, **changed))}
    return row


def _caption(scene: _Scene) -> str:
    article = "an" if scene.colour[0] in "aeiou" else "a"
    return f"{article} {scene.colour} {scene.shape} on a {scene.background} background"


def _draw_scene(rng: random.Random, scene: _Scene, size: int) -> Image.Image:
    side = round(size * rng.uniform(0.35, 0.6))
    x, y = rng.randint(0, size - side), rng.randint(0, size - side)
    shade = rng.randint(-12, 12)
    background = tuple(min(255, max(0, c + shade)) for c in BACKGROUNDS[scene.background])
    return _render(background, [(scene.shape, COLOURS[scene.colour], (x, y, x + side, y + side))], size)


def _draw_many(rng: random.Random, count: int, size: int) -> Image.Image:
    """``count`` shapes, one per quadrant so they never overlap and stay countable."""
    half = size // 2
    shapes = []
    for qx, qy in rng.sample([(0, 0), (1, 0), (0, 1), (1, 1)], count):
        side = round(half * rng.uniform(0.5, 0.8))
        x, y = qx * half + rng.randint(0, half - side), qy * half + rng.randint(0, half - side)
        shapes.append((rng.choice(SHAPES), rng.choice(tuple(COLOURS.values())), (x, y, x + side, y + side)))
    return _render(rng.choice(tuple(BACKGROUNDS.values())), shapes, size)


def _render(background: tuple[int, ...], shapes: list[Shape], size: int) -> Image.Image:
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    for name, fill, (x0, y0, x1, y1) in shapes:
        if name == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif name == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return image


def _save(path: Path, image: Image.Image) -> None:
    with atomic_write(path, "wb") as handle:
        image.save(handle, format="PNG")
