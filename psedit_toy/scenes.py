"""Captioned toy scenes with ground truth: the data of PSEdit's trained toy world.

A scene is one or two flat-coloured objects (circle, square, triangle, star in six saturated colours) on a
low-chroma background (five colours, five textures). Everything is a pure function of a :class:`Scene`, so an edit
has an exact right answer: render the edited scene with the same geometry. Pure numpy; no torch, no ComfyUI.

Object colours are saturated (chroma max-min >= 150 of 255) and background colours are not (<= 60), so an object's
pixels can be found in any image, generated or edited, by chroma alone (:func:`object_mask`).

The world has versions (:data:`WORLDS`): what differs is only how large the random scenes' objects are, so render()
and the classifiers serve every version. ``toy-scenes-v1`` draws radii 14-28 px; ``toy-scenes-v2`` draws single
objects of 22-36 px (5.5 to 9 latent cells across instead of 3.5 to 7, so a star's points span whole cells) and pairs
of 16-26 px (so two still fit). :data:`DATA_VERSION`, the default of every generator here, is the world of the
committed model (its manifest's ``data_version``), so scenes and weights change together.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np

SIZE = 128
SUPERSAMPLE = 2  # render at 2x and average 2x2 blocks: anti-aliased edges

OBJECT_COLOURS = {
    "red": (220, 30, 30), "orange": (240, 130, 20), "yellow": (230, 210, 20),
    "green": (30, 170, 40), "blue": (30, 60, 220), "purple": (150, 40, 200),
}
BACKGROUND_COLOURS = {
    "gray": (128, 128, 128), "white": (222, 222, 216), "black": (40, 40, 44),
    "brown": (115, 80, 58), "beige": (205, 190, 158),
}
SHAPES = ("circle", "square", "triangle", "star")
TEXTURES = ("plain", "striped", "checkered", "gradient", "noisy")
# colour x shape pairs never shown in training: edits toward them measure generalisation
HELD_OUT_PAIRS = frozenset({("red", "star"), ("blue", "triangle"), ("green", "circle"), ("yellow", "square")})
CHROMA_THRESHOLD = 100  # between the backgrounds' <= 60 and the objects' >= 150


@dataclasses.dataclass(frozen=True)
class WorldSpec:
    """What one version of the world draws: object radius ranges (pixels) in one- and two-object scenes."""

    radius: tuple[float, float]
    radius_pair: tuple[float, float]


WORLDS = {
    "toy-scenes-v1": WorldSpec(radius=(14, 28), radius_pair=(14, 28)),
    "toy-scenes-v2": WorldSpec(radius=(22, 36), radius_pair=(16, 26)),
}
LATEST = "toy-scenes-v2"


COMMITTED_MANIFEST = Path(__file__).resolve().parent / "weights" / "manifest.json"


def committed_version(manifest: Path = COMMITTED_MANIFEST) -> str:
    """The world the committed model was trained on (its manifest's ``data_version``); v1 without a manifest."""
    try:
        version = json.loads(manifest.read_text())["data_version"]
    except (OSError, ValueError, KeyError):
        return "toy-scenes-v1"
    if version not in WORLDS:
        raise ValueError(f"{manifest}: unknown data_version {version!r}; known: {sorted(WORLDS)}")
    return version


DATA_VERSION = committed_version()


@dataclasses.dataclass(frozen=True)
class Obj:
    colour: str
    shape: str
    cx: float  # centre, pixels
    cy: float
    r: float  # half-extent, pixels


@dataclasses.dataclass(frozen=True)
class Scene:
    background: str
    texture: str
    objects: tuple[Obj, ...]
    seed: int  # texture details (stripe direction, noise)

    def replace_object(self, i: int = 0, **changes) -> Scene:
        objs = list(self.objects)
        objs[i] = dataclasses.replace(objs[i], **changes)
        return dataclasses.replace(self, objects=tuple(objs))


def caption(scene: Scene) -> str:
    """'a red circle on a gray striped background'; two objects: 'a red circle and a blue star on ...'."""
    things = " and ".join(f"a {o.colour} {o.shape}" for o in scene.objects)
    return f"{things} on a {scene.background} {scene.texture} background"


def _polygon(px: np.ndarray, py: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test of every (px, py) against vertices [N, 2]."""
    inside = np.zeros(px.shape, dtype=bool)
    x1, y1 = verts[:, 0], verts[:, 1]
    x2, y2 = np.roll(x1, -1), np.roll(y1, -1)
    for a, b, c, d in zip(x1, y1, x2, y2, strict=True):
        if b == d:
            continue
        crosses = (b > py) != (d > py)
        xint = a + (py - b) * (c - a) / (d - b)
        inside ^= crosses & (px < xint)
    return inside


def _shape_verts(shape: str) -> np.ndarray | None:
    """Unit-size outline (half-extent 1, y down); None for the circle."""
    if shape == "square":
        return np.array([[-0.85, -0.85], [0.85, -0.85], [0.85, 0.85], [-0.85, 0.85]])
    if shape == "triangle":
        return np.array([[0.0, -1.0], [1.0, 0.75], [-1.0, 0.75]])
    if shape == "star":
        ang = -np.pi / 2 + np.arange(10) * np.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        return np.stack([rad * np.cos(ang), rad * np.sin(ang) + 0.1], axis=1)
    if shape == "circle":
        return None
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def shape_mask(shape: str, cx: float, cy: float, r: float, size: int = SIZE, ss: int = 1) -> np.ndarray:
    """Boolean mask [size*ss, size*ss] of a shape (pixel centres sampled at ss x resolution)."""
    n = size * ss
    coords = (np.arange(n) + 0.5) / ss
    px, py = np.meshgrid(coords, coords)
    u, v = (px - cx) / r, (py - cy) / r
    verts = _shape_verts(shape)
    if verts is None:
        return u * u + v * v <= 1.0
    return _polygon(u, v, verts)


def _background(scene: Scene, n: int) -> np.ndarray:
    rng = np.random.default_rng(scene.seed)
    base = np.array(BACKGROUND_COLOURS[scene.background], dtype=np.float64)
    shade = _shade(base)  # same hue, lower or higher value: chroma stays low
    coords = (np.arange(n) + 0.5) / n * SIZE
    px, py = np.meshgrid(coords, coords)
    t = scene.texture
    if t == "plain":
        w = np.zeros((n, n))
    elif t == "striped":
        along = px if rng.random() < 0.5 else py
        w = (np.floor(along / 8) % 2).astype(np.float64)
    elif t == "checkered":
        w = ((np.floor(px / 16) + np.floor(py / 16)) % 2).astype(np.float64)
    elif t == "gradient":
        a = rng.uniform(0, 2 * np.pi)
        proj = (px - SIZE / 2) * np.cos(a) + (py - SIZE / 2) * np.sin(a)
        w = np.clip(proj / SIZE + 0.5, 0, 1)
    elif t == "noisy":
        blocks = rng.normal(0.5, 0.35, (SIZE // 8, SIZE // 8)).clip(0, 1)
        w = np.kron(blocks, np.ones((n * 8 // SIZE, n * 8 // SIZE)))
    else:
        raise ValueError(f"unknown texture {t!r}; known: {TEXTURES}")
    return base[None, None] * (1 - w[..., None]) + shade[None, None] * w[..., None]


def render(scene: Scene, size: int = SIZE) -> tuple[np.ndarray, list[np.ndarray]]:
    """RGB uint8 [size, size, 3] and one boolean mask [size, size] per object (coverage >= 1/2).

    Later objects are drawn over earlier ones; each mask is the object's visible area.
    """
    ss = SUPERSAMPLE * size // SIZE if size >= SIZE else SUPERSAMPLE
    n = SIZE * ss
    img = _background(scene, n)
    visible = []
    for o in scene.objects:
        m = shape_mask(o.shape, o.cx, o.cy, o.r, SIZE, ss)
        img[m] = OBJECT_COLOURS[o.colour]
        visible = [v & ~m for v in visible] + [m]
    f = n // size

    def pool(a):
        return a.reshape(size, f, size, f, *a.shape[2:]).mean(axis=(1, 3))

    image = np.clip(np.round(pool(img)), 0, 255).astype(np.uint8)
    return image, [pool(v.astype(np.float64)) >= 0.5 for v in visible]


def _place(rng: np.random.Generator, placed: list[Obj], colour: str, shape: str,
           radius: tuple[float, float]) -> Obj | None:
    for _ in range(50):
        r = float(rng.uniform(*radius))
        cx, cy = (float(rng.uniform(r + 4, SIZE - r - 4)) for _ in range(2))
        if all(np.hypot(cx - p.cx, cy - p.cy) > r + p.r + 6 for p in placed):
            return Obj(colour, shape, round(cx, 2), round(cy, 2), round(r, 2))
    return None


def random_scene(rng: np.random.Generator, two_objects: float = 0.25, held_out: bool = False,
                 version: str | None = None) -> Scene:
    """A scene whose colour x shape pairs are all held in (training) or, with ``held_out``, the first one held out;
    object sizes from world ``version`` (default :data:`DATA_VERSION`)."""
    spec = WORLDS[version or DATA_VERSION]
    n_obj = 2 if rng.random() < two_objects else 1
    radius = spec.radius if n_obj == 1 else spec.radius_pair
    objs: list[Obj] = []
    colours, shapes = list(OBJECT_COLOURS), list(SHAPES)
    while len(objs) < n_obj:
        if held_out and not objs:
            colour, shape = sorted(HELD_OUT_PAIRS)[rng.integers(len(HELD_OUT_PAIRS))]
        else:
            colour, shape = colours[rng.integers(len(colours))], shapes[rng.integers(len(shapes))]
            if (colour, shape) in HELD_OUT_PAIRS or any(o.colour == colour for o in objs):
                continue
        o = _place(rng, objs, colour, shape, radius)
        if o is not None:
            objs.append(o)
    bgs = list(BACKGROUND_COLOURS)
    return Scene(bgs[rng.integers(len(bgs))], TEXTURES[rng.integers(len(TEXTURES))], tuple(objs),
                 int(rng.integers(2**31)))


def training_scenes(n: int, seed: int = 0, version: str | None = None) -> list[Scene]:
    rng = np.random.default_rng([seed, 0xC0FFEE])
    return [random_scene(rng, version=version) for _ in range(n)]


def dataset_digest(scenes: list[Scene], version: str | None = None) -> str:
    """sha256 over the world's version and the scenes' repr: the manifest's record of exactly which data a model
    saw."""
    h = hashlib.sha256((version or DATA_VERSION).encode())
    for s in scenes:
        h.update(repr(s).encode())
    return h.hexdigest()


# --- classifiers (work on any RGB image: generated, edited or rendered) ----------------------------------------------

def object_mask(image: np.ndarray) -> np.ndarray:
    """Saturated pixels: where objects are (backgrounds are low-chroma by construction)."""
    img = image.astype(np.int32)
    return (img.max(axis=-1) - img.min(axis=-1)) >= CHROMA_THRESHOLD


def largest_region(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage  # scikit-image's dependency; only the classifiers need it

    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (1 + int(np.argmax(sizes)))


def nearest_colour(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    d = [np.sum((np.asarray(rgb, dtype=np.float64) - np.array(palette[k])) ** 2) for k in names]
    return names[int(np.argmin(d))]


def _box_normalised(mask: np.ndarray, n: int = 32) -> np.ndarray | None:
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return None
    crop = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    yi = (np.arange(n) + 0.5) * crop.shape[0] / n
    xi = (np.arange(n) + 0.5) * crop.shape[1] / n
    return crop[yi.astype(int)][:, xi.astype(int)]


_TEMPLATES: dict[str, np.ndarray] = {}


def classify_shape(mask: np.ndarray) -> tuple[str | None, float]:
    """Shape by template IoU after scaling the region and each template to their bounding boxes."""
    norm = _box_normalised(mask)
    if norm is None or mask.sum() < 20:
        return None, 0.0
    if not _TEMPLATES:
        for s in SHAPES:
            _TEMPLATES[s] = _box_normalised(shape_mask(s, 64, 64, 50))
    ious = {s: float((norm & t).sum() / max((norm | t).sum(), 1)) for s, t in _TEMPLATES.items()}
    best = max(ious, key=ious.get)
    return best, ious[best]


def classify_object(image: np.ndarray, region: np.ndarray | None = None) -> tuple[str | None, str | None]:
    """(colour, shape) of the largest saturated region (within ``region`` if given); (None, None) if none."""
    m = object_mask(image)
    if region is not None:
        m &= region
    m = largest_region(m)
    if m.sum() < 20:
        return None, None
    colour = nearest_colour(image[m].mean(axis=0), OBJECT_COLOURS)
    return colour, classify_shape(m)[0]


def _shade(base: np.ndarray) -> np.ndarray:
    return base + 55 if base.mean() < 90 else base * 0.72


def classify_background(image: np.ndarray, keep_out: np.ndarray | None = None) -> str:
    """Background colour: the mean of unsaturated pixels (outside ``keep_out``), nearest of each colour's base and
    its half-and-half mix with its shade (plain backgrounds are the base; textured ones average to about the mix)."""
    m = ~object_mask(image)
    if keep_out is not None:
        m &= ~keep_out
    mean = image[m].mean(axis=0) if m.any() else image.reshape(-1, 3).mean(axis=0)
    best, dist = None, np.inf
    for name, v in BACKGROUND_COLOURS.items():
        base = np.array(v, dtype=np.float64)
        for ref in (base, 0.5 * (base + _shade(base))):
            d = float(np.sum((mean - ref) ** 2))
            if d < dist:
                best, dist = name, d
    return best
