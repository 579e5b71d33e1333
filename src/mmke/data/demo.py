"""A deterministic synthetic world, written as E-VQA / E-IC datasets, so everything runs offline.

A *scene* is one object with five attributes (shape, colour, size, horizontal position,
background): 3 x 6 x 2 x 3 x 3 = 324 distinct scenes. Every scene can be rendered many ways
(jittered position, size and shades), which gives the image-generality pairs. A fixed fraction of
the scenes is held out: the train split only shows train scenes and the eval split only held-out
scenes, for every dataset kind and seed, so a model pretrained on any train split
(:mod:`mmke.world_training`) is measured on scenes it has never seen.

Edit records ask to change one fact of one scene to a counterfactual: ``pred`` is the world's
truth (what a model that learnt the world answers), ``alt`` another value of the same attribute.
Text locality asks invented facts (no pretrained model can know them); multimodal locality asks
how many objects an unrelated picture shows. Edits have consequences: invented text facts tie
each colour to the metal things of that colour are made of, and each metal to where it is mined,
so VLKEB-style records (``kind="vlkeb"``) ask after a colour edit which metal the object is made
of (1-hop) and where that metal is mined (2-hop), whose answers follow the new colour. Output is a pure function of the arguments (seeded
``random.Random``, PNGs without timestamps): Snakemake can rebuild it byte for byte.
"""

from __future__ import annotations

import itertools
import os
import random
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image, ImageDraw

from mmke.io import atomic_write, write_json

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
           "yellow": (235, 210, 40), "purple": (140, 60, 180), "orange": (240, 140, 30)}
BACKGROUNDS = {"grey": (128, 128, 128), "white": (240, 240, 240), "black": (25, 25, 25)}
# Shapes and sizes a tiny model seeing 32 pixels tells apart within the demo's budget: a filled
# circle differs from a square in a few corner pixels there (it stayed at 0.7-0.8 on circle vs
# square), a hollow ring does not; objects are at least 0.3 of the picture, several patches wide.
SHAPES = ("ring", "square", "triangle")
SIZES = {"small": (0.3, 0.36), "large": (0.5, 0.6)}  # side as a fraction of the image
POSITIONS = ("left", "middle", "right")
NUMBERS = ("one", "two", "three", "four")
ATTRIBUTES = {"shape": SHAPES, "colour": tuple(COLOURS), "size": tuple(SIZES),
              "position": POSITIONS, "background": tuple(BACKGROUNDS)}

# Scenes of the eval splits, never drawn in a train split. Fixed, not per dataset seed, so that
# every demo dataset (E-VQA and E-IC alike) holds out the same scenes.
HELDOUT_FRACTION = 0.2
WORLD_SEED = "mmke-world-v1"

# attribute -> (question, rephrasings)
VQA_QUESTIONS = {
    "colour": ("What colour is the shape?",
               ("Which colour does the shape in the picture have?", "What is the colour of the object shown?")),
    "shape": ("What shape is shown in the image?",
              ("Which geometric figure appears in this picture?", "What kind of shape can be seen here?")),
    "size": ("How big is the shape?",
             ("What size is the object in the picture?", "Is the shape in this image small or large?")),
    "position": ("Where is the shape in the picture?",
                 ("On which side of the image is the object?", "In what part of the picture is the shape?")),
    "background": ("What colour is the background?",
                   ("Which colour is the area behind the shape?", "What is the colour of the backdrop?")),
}
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
# The consequences of an object's colour (VLKEB's portability): the metal things of a colour are
# made of, and where each metal is mined. Invented and one-to-one, so every colour edit changes
# both answers; stated as text facts (kind "tie"), asked about a picture as the 1-hop / 2-hop
# questions (kinds "metal" and "mine").
METALS = {"red": "copper", "green": "nickel", "blue": "cobalt", "yellow": "brass", "purple": "bismuth",
          "orange": "bronze"}
MINES = {"copper": "Arlen", "nickel": "Halden", "cobalt": "Corran", "brass": "Garrow", "bismuth": "Elvay",
         "bronze": "Fenlow"}
TIES = (*((f"What are {colour} things made of?", metal) for colour, metal in METALS.items()),
        *((f"Where is {metal} mined?", mine) for metal, mine in MINES.items()))
HOP_QUESTIONS = {"metal": "What metal is the shape made of?", "mine": "Where was the metal of the shape mined?"}
# Every word the world's questions, captions and answers use: the tiny models' tokenizer
# trains on it, so each answer is a single token and the model has a small answer vocabulary.
WORLD_TEXT = (
    *(text for question, rephrasings in VQA_QUESTIONS.values() for text in (question, *rephrasings)),
    CAPTION_PROMPT, *CAPTION_REPHRASES, *COUNT_QUESTIONS, *(f"{q} {a}" for q, a in (*FACTS, *TIES)),
    *HOP_QUESTIONS.values(),
    " ".join(("answers:", *(word for values in ATTRIBUTES.values() for word in values), *NUMBERS)),
    "a small red ring on the left of a grey background. a large blue square in the middle of a white background.",
)

Shape = tuple[str, tuple[int, int, int], tuple[int, int, int, int]]  # name, fill, box


@dataclass(frozen=True)
class Scene:
    """One object in a picture; the facts a model of this world should know."""

    shape: str
    colour: str
    size: str
    position: str
    background: str


def all_scenes() -> list[Scene]:
    """The whole world, in a fixed order."""
    return [Scene(**dict(zip(ATTRIBUTES, values))) for values in itertools.product(*ATTRIBUTES.values())]


def scene_split(split: str) -> list[Scene]:
    """The scenes a split may show: ``train`` and ``eval`` are disjoint and cover the world."""
    if split not in ("train", "eval"):
        raise ValueError(f"unknown split {split!r}; valid: train, eval")
    scenes = all_scenes()
    random.Random(WORLD_SEED).shuffle(scenes)
    n_heldout = round(len(scenes) * HELDOUT_FRACTION)
    return scenes[:n_heldout] if split == "eval" else scenes[n_heldout:]


def caption(scene: Scene) -> str:
    """The E-IC caption: states every attribute, so each scene has exactly one caption."""
    where = "in the middle" if scene.position == "middle" else f"on the {scene.position}"
    return f"a {scene.size} {scene.colour} {scene.shape} {where} of a {scene.background} background"


def consequence(kind: str, colour: str) -> str:
    """The answer of a 1-hop (``metal``) or 2-hop (``mine``) question about an object of ``colour``."""
    metal = METALS[colour]
    return {"metal": metal, "mine": MINES[metal]}[kind]


def scene_facts(scene: Scene) -> list[tuple[str, str, str]]:
    """Every (kind, prompt, true answer) the world states about a scene: each attribute asked in
    each wording (kind = the attribute), and the caption under each caption prompt."""
    facts = [(attribute, prompt, getattr(scene, attribute))
             for attribute, (question, rephrasings) in VQA_QUESTIONS.items() for prompt in (question, *rephrasings)]
    return facts + [("caption", prompt, caption(scene)) for prompt in (CAPTION_PROMPT, *CAPTION_REPHRASES)]


def write_demo_dataset(out_dir: str | os.PathLike, kind: str, n_train: int = 24, n_eval: int = 24,
                       seed: int = 0, image_size: int = 64) -> dict[str, Path]:
    """Write ``train.json``, ``eval.json`` and ``images/`` under ``out_dir``.

    ``kind`` ``evqa`` edits any attribute, ``eic`` the caption, and ``vlkeb`` the colour, with
    VLKEB's ``port_new``: the 1-hop and 2-hop questions whose answers follow the new colour.
    Image fields are relative to ``out_dir/images``, the image root (and rephrase root) for
    loading: the workflow declares that folder as the stage's output and later stages' input.
    Returns the paths under the keys ``train``, ``eval`` and ``images``.
    """
    if kind not in ("evqa", "eic", "vlkeb"):
        raise ValueError(f"unknown dataset kind {kind!r}; valid: evqa, eic, vlkeb")
    if n_train < 0 or n_eval < 0:
        raise ValueError(f"record counts must be >= 0, got n_train={n_train}, n_eval={n_eval}")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16 to draw distinguishable shapes, got {image_size}")
    out = Path(out_dir)
    paths = {"train": out / "train.json", "eval": out / "eval.json", "images": out / "images"}
    for split, n in (("train", n_train), ("eval", n_eval)):
        # One generator per split: changing n_eval leaves the training set untouched.
        rng = random.Random(f"{kind}:{split}:{seed}")
        scenes = scene_split(split)
        rows = [_record(rng, rng.choice(scenes), paths["images"], f"{split}/{i:05d}", kind, image_size)
                for i in range(n)]
        write_json(paths[split], rows)
    return paths


def _record(rng: random.Random, scene: Scene, root: Path, stem: str, kind: str, size: int) -> dict:
    image, image_rephrase, m_loc = f"{stem}.png", f"{stem}_rephrase.png", f"{stem}_mloc.png"
    # Same scene twice, rendered with fresh jitter: the image-generality pair.
    _save(root / image, draw_scene(rng, scene, size))
    _save(root / image_rephrase, draw_scene(rng, scene, size))
    count = rng.randint(1, len(NUMBERS))
    _save(root / m_loc, draw_many(rng, count, size))
    loc, loc_ans = rng.choice(FACTS)
    row = {"image": image, "image_rephrase": image_rephrase, "loc": loc, "loc_ans": loc_ans,
           "m_loc": m_loc, "m_loc_q": rng.choice(COUNT_QUESTIONS), "m_loc_a": NUMBERS[count - 1]}
    if kind in ("evqa", "vlkeb"):
        attribute = rng.choice(tuple(VQA_QUESTIONS)) if kind == "evqa" else "colour"
        question, rephrasings = VQA_QUESTIONS[attribute]
        truth = getattr(scene, attribute)
        row |= {"src": question, "rephrase": rng.choice(rephrasings), "pred": truth,
                "alt": _counterfactual(rng, attribute, truth)}
        if kind == "vlkeb":
            row["port_new"] = [{"port_type": hop, "Q&A": {"Question": HOP_QUESTIONS[name],
                                                          "Answer": consequence(name, row["alt"])}}
                               for hop, name in (("1-hop", "metal"), ("2-hop", "mine"))]
    else:
        attribute = rng.choice(tuple(ATTRIBUTES))
        changed = {attribute: _counterfactual(rng, attribute, getattr(scene, attribute))}
        row |= {"src": CAPTION_PROMPT, "rephrase": rng.choice(CAPTION_REPHRASES),
                "pred": caption(scene), "alt": caption(replace(scene, **changed))}
    return row


def _counterfactual(rng: random.Random, attribute: str, truth: str) -> str:
    return rng.choice([value for value in ATTRIBUTES[attribute] if value != truth])


def draw_scene(rng: random.Random, scene: Scene, size: int) -> Image.Image:
    """One rendering: the attributes fix the picture's content, the jitter its pixels."""
    low, high = SIZES[scene.size]
    side = round(size * rng.uniform(low, high))
    slack = size - side
    # Left and right hug their edge, middle stays centred; each with a little horizontal jitter.
    centre = {"left": 0.08, "middle": 0.5, "right": 0.92}[scene.position]
    x = min(slack, max(0, round(slack * centre + rng.uniform(-0.06, 0.06) * size)))
    y = rng.randint(0, slack)
    background = _jitter(rng, BACKGROUNDS[scene.background], 12)
    return _render(background, [(scene.shape, _jitter(rng, COLOURS[scene.colour], 15), (x, y, x + side, y + side))], size)


def _jitter(rng: random.Random, rgb: tuple[int, int, int], amount: int) -> tuple[int, int, int]:
    shade = rng.randint(-amount, amount)
    return tuple(min(255, max(0, c + shade)) for c in rgb)


def draw_many(rng: random.Random, count: int, size: int) -> Image.Image:
    """``count`` shapes, one per quadrant so they never overlap and stay countable (each fills
    most of its quadrant: at half that size the tiny model confused neighbouring counts)."""
    half = size // 2
    shapes = []
    for qx, qy in rng.sample([(0, 0), (1, 0), (0, 1), (1, 1)], count):
        side = round(half * rng.uniform(0.7, 0.9))
        x, y = qx * half + rng.randint(0, half - side), qy * half + rng.randint(0, half - side)
        shapes.append((rng.choice(SHAPES), rng.choice(tuple(COLOURS.values())), (x, y, x + side, y + side)))
    return _render(rng.choice(tuple(BACKGROUNDS.values())), shapes, size)


def _render(background: tuple[int, ...], shapes: list[Shape], size: int) -> Image.Image:
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    for name, fill, (x0, y0, x1, y1) in shapes:
        if name == "ring":
            draw.ellipse((x0, y0, x1, y1), outline=fill, width=max(2, round((x1 - x0) / 5)))
        elif name == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return image


def _save(path: Path, image: Image.Image) -> None:
    with atomic_write(path, "wb") as handle:
        image.save(handle, format="PNG")
