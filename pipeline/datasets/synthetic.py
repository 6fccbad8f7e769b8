"""The built-in synthetic dataset: outdoor scenes drawn with numpy, with exact label maps.

Made to be a small but honest segmentation problem: stuff classes differ in colour *and* texture,
every class is drawn in several palettes with per-image colour jitter (colour alone is no perfect
cue: grass and tree crowns share greens, water and sky share blues, cars take any colour), objects
are made of differently coloured parts that all carry the object's class, and layout, scale and
occlusion are random. Generation is deterministic: image i of a split depends only on (seed, split, i).
"""
from __future__ import annotations

import contextlib
import contextvars
import fcntl
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.datasets.folder import Folder
from pipeline.errors import UserError
from pipeline.files import atomic_write_png, atomic_write_text

VERSION = 1   # bump when the drawing code changes: existing folders then regenerate
CLASS_NAMES = ["sky", "water", "grass", "road", "building", "tree", "car", "person"]
SKY, WATER, GRASS, ROAD, BUILDING, TREE, CAR, PERSON = range(len(CLASS_NAMES))
MARKER = "synthetic.json"
# False while a read-only command (`hp-pipe status`) looks at the dataset: nothing is generated or created then
GENERATE: contextvars.ContextVar[bool] = contextvars.ContextVar("GENERATE", default=True)


@contextlib.contextmanager
def read_only() -> Iterator[None]:
    """Within this block a synthetic dataset that does not exist yet is reported as missing, not generated."""
    token = GENERATE.set(False)
    try:
        yield
    finally:
        GENERATE.reset(token)
SPLIT_CODES = {"train": 0, "val": 1}

SKY_PALETTES = [((60, 120, 210), (170, 205, 240)), ((150, 155, 165), (205, 205, 210)),
                ((70, 80, 160), (250, 170, 110)), ((30, 90, 190), (120, 180, 230))]
WATER_COLOURS = [(30, 80, 140), (40, 110, 120), (60, 90, 80), (90, 130, 170), (20, 50, 90)]
GRASS_COLOURS = [(70, 130, 40), (100, 150, 50), (50, 100, 35), (140, 150, 70), (80, 120, 60)]
ROAD_COLOURS = [(95, 95, 100), (125, 125, 125), (70, 70, 75), (130, 115, 100), (150, 145, 140)]
WALL_COLOURS = [(170, 80, 60), (200, 190, 160), (150, 150, 155), (220, 220, 215), (120, 90, 70),
                (180, 150, 110)]
ROOF_COLOURS = [(120, 40, 30), (70, 60, 55), (90, 95, 100), (140, 80, 50)]
WINDOW_COLOURS = [(40, 60, 90), (230, 210, 120), (120, 150, 170), (30, 35, 40)]
CROWN_COLOURS = [(40, 90, 30), (60, 120, 40), (30, 70, 35), (90, 140, 50), (180, 110, 40), (150, 60, 30)]
TRUNK_COLOURS = [(90, 60, 35), (70, 55, 45), (110, 85, 60)]
CAR_COLOURS = [(190, 30, 30), (30, 60, 160), (230, 230, 230), (170, 175, 180), (30, 30, 35), (230, 190, 40),
               (40, 120, 60), (120, 40, 120)]
SKIN_COLOURS = [(240, 200, 170), (200, 150, 110), (140, 95, 65), (90, 60, 40)]
SHIRT_COLOURS = [(200, 40, 40), (40, 80, 180), (240, 240, 240), (30, 30, 30), (60, 150, 70), (230, 200, 60),
                 (150, 90, 170), (240, 130, 40)]
PAINT_COLOURS = [(240, 240, 240), (230, 200, 60)]
HAIR_COLOURS = [(40, 30, 20), (120, 80, 40), (20, 20, 20), (200, 180, 120)]
TROUSER_COLOURS = [(40, 50, 90), (30, 30, 30), (170, 150, 110), (100, 100, 105)]


def ensure_synthetic(root: Path, n_train: int, n_val: int, size: int, seed: int) -> Path:
    """Generate root/{train,val}/{images,labels}/*.png unless root/synthetic.json says they exist."""
    root = Path(root)
    params = {"version": VERSION, "n_train": int(n_train), "n_val": int(n_val), "size": int(size),
              "seed": int(seed)}
    if size < 32 or n_train < 0 or n_val < 0:
        raise UserError(f"synthetic dataset: size must be >= 32 and counts >= 0, got {params}")
    marker = root / MARKER
    if _marker_matches(marker, params):
        return root
    if not GENERATE.get():
        raise UserError(f"the synthetic dataset under {root} is not generated yet (any stage generates it)")
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:   # concurrent callers (workers) generate once
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _marker_matches(marker, params):
            _generate(root, params)
    return root


def _generate(root: Path, params: dict) -> None:
    marker = root / MARKER
    marker.unlink(missing_ok=True)   # the old set is invalid from here on, even if we are interrupted
    n_train, n_val, size, seed = params["n_train"], params["n_val"], params["size"], params["seed"]
    counts = {"train": n_train, "val": n_val}
    for split, n in counts.items():
        for sub in ("images", "labels"):
            d = root / split / sub
            d.mkdir(parents=True, exist_ok=True)
            for old in d.iterdir():
                if old.is_file() and (old.suffix == ".png" or old.name.endswith(".tmp")):
                    old.unlink()
        for i in range(n):
            rng = np.random.default_rng(np.random.SeedSequence([seed, SPLIT_CODES[split], i]))
            image, label = render_scene(rng, size)
            name = f"{split}_{i:05d}.png"
            atomic_write_png(root / split / "images" / name, image, compress_level=1)
            atomic_write_png(root / split / "labels" / name, label, compress_level=1)
    atomic_write_text(marker, json.dumps({**params, "class_names": CLASS_NAMES}, indent=2) + "\n")


def _marker_matches(marker: Path, params: dict) -> bool:
    try:
        found = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    if any(found.get(k) != v for k, v in params.items()):
        return False
    return all((marker.parent / s / sub / f"{s}_{i:05d}.png").is_file()
               for s in ("train", "val") for i in range(params[f"n_{s}"]) for sub in ("images", "labels"))




class Synthetic(Folder):
    """The generated folder, read as a `folder` dataset with the 8 scene classes."""

    name = "synthetic"
    layout = "  generated: {train,val}/images/*.png, {train,val}/labels/*.png, synthetic.json"

    def __init__(self, root: str | Path, split: str, n_train: int = 40, n_val: int = 16, size: int = 448,
                 seed: int = 0, n_classes: int | None = None) -> None:
        if n_classes not in (None, len(CLASS_NAMES)):
            raise UserError(f"dataset.n_classes = {n_classes}, but synthetic has {len(CLASS_NAMES)} "
                            f"classes — remove the override or set it to {len(CLASS_NAMES)}")
        if split not in SPLIT_CODES:
            raise UserError(f"unknown split {split!r} for dataset synthetic: use train or val")
        if (n_train if split == "train" else n_val) < 1:
            raise UserError(f"synthetic dataset: the {split} split is empty (n_{split} = 0)")
        ensure_synthetic(Path(root).expanduser(), n_train, n_val, size, seed)
        super().__init__(root, split, n_classes=len(CLASS_NAMES), class_names=CLASS_NAMES)


# ----------------------------------------------------------------------------- drawing


class _Canvas:
    """An RGB float canvas and its label map, painted together so labels are exact by construction."""

    def __init__(self, rng: np.random.Generator, size: int) -> None:
        self.rng, self.size = rng, size
        self.rgb = np.zeros((size, size, 3), np.float32)
        self.lab = np.zeros((size, size), np.uint8)
        self.yy = (np.arange(size, dtype=np.float32) + 0.5)[:, None]
        self.xx = (np.arange(size, dtype=np.float32) + 0.5)[None, :]

    def region(self, mask: np.ndarray, field: np.ndarray, cls: int) -> None:
        """Paint `field` ((S,S,3) or one colour) where the (S,S) mask is set."""
        np.copyto(self.rgb, field, where=mask[..., None])
        np.copyto(self.lab, np.uint8(cls), where=mask)

    def shape(self, box, cls, colour, shape=None, grain: float = 0.04) -> None:
        """Paint `shape(ys, xs) -> bool` (default: the whole box) inside box = (y0, y1, x0, x1)."""
        y0, y1 = max(int(round(box[0])), 0), min(int(round(box[1])), self.size)
        x0, x1 = max(int(round(box[2])), 0), min(int(round(box[3])), self.size)
        if y0 >= y1 or x0 >= x1:
            return
        h, w = y1 - y0, x1 - x0
        if shape is None:
            m = np.ones((h, w), bool)
        else:
            m = np.broadcast_to(shape(self.yy[y0:y1], self.xx[:, x0:x1]), (h, w))
        col = np.asarray(colour, np.float32) * (1 + grain * self.rng.standard_normal((h, w, 1), np.float32))
        self.rgb[y0:y1, x0:x1][m] = col[m]
        self.lab[y0:y1, x0:x1][m] = cls

    def noise(self, cells_y: int, cells_x: int) -> np.ndarray:
        """Smooth value noise in [0, 1]: a coarse random grid bilinearly upsampled to the canvas."""
        grid = self.rng.random((max(cells_y, 1) + 1, max(cells_x, 1) + 1), dtype=np.float32)
        return np.asarray(Image.fromarray(grid).resize((self.size, self.size), Image.BILINEAR))

    def colour(self, palette, jitter: float = 18.0) -> np.ndarray:
        base = np.asarray(palette[self.rng.integers(len(palette))], np.float32)
        return np.clip(base + self.rng.normal(0, jitter, 3), 0, 255).astype(np.float32)


def _ellipse(cy, cx, ry, rx):
    return lambda ys, xs: ((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2 <= 1


def _triangle(top, bottom, cx, half):
    """Apex at (top, cx), base of half-width `half` at `bottom`."""
    return lambda ys, xs: np.abs(xs - cx) <= half * (ys - top) / max(bottom - top, 1e-3)


def _trapezoid(top, bottom, cx, half_top, half_bottom):
    slope = (half_bottom - half_top) / max(bottom - top, 1)
    return lambda ys, xs: np.abs(xs - cx) <= half_top + slope * (ys - top)


def _sky(c: _Canvas, horizon: float) -> np.ndarray:
    top, bottom = SKY_PALETTES[c.rng.integers(len(SKY_PALETTES))]
    top = np.clip(np.asarray(top) + c.rng.normal(0, 15, 3), 0, 255)
    bottom = np.clip(np.asarray(bottom) + c.rng.normal(0, 15, 3), 0, 255)
    t = np.clip(c.yy / max(horizon, 1), 0, 1)[..., None]
    field = np.broadcast_to(top * (1 - t) + bottom * t, (c.size, c.size, 3)).astype(np.float32)
    if c.rng.random() < 0.7:   # clouds: soft blobs of grey-white
        alpha = np.clip((c.noise(4, 6) - c.rng.uniform(0.45, 0.65)) * 3, 0, 0.85)[..., None]
        cloud = np.float32(c.rng.uniform(200, 250))
        field = field * (1 - alpha) + cloud * alpha
    return field


def _water(c: _Canvas, horizon: float) -> np.ndarray:
    base = c.colour(WATER_COLOURS)
    depth = np.clip((c.yy - horizon) / max(c.size - horizon, 1), 0, 1)
    period = c.rng.uniform(3, 6) * (1 + 4 * depth)
    phase = 2 * np.pi * ((c.yy - horizon) / period + 1.5 * c.noise(3, 8))
    wave = np.sin(phase)
    amp = c.rng.uniform(0.08, 0.25)
    field = base * (1 + amp * wave)[..., None] + 45 * (wave > 0.92)[..., None]
    return field.astype(np.float32)


def _grass(c: _Canvas) -> np.ndarray:
    base = c.colour(GRASS_COLOURS)
    fine = c.rng.random((c.size, c.size), dtype=np.float32)
    kind = c.rng.integers(3)
    if kind == 0:     # blades: tall thin streaks
        streaks = c.noise(c.size // 24, c.size // 2)
        shade = 0.7 + 0.45 * streaks + 0.15 * fine
    elif kind == 1:   # mowed: diagonal bands
        width = c.rng.uniform(0.06, 0.14) * c.size
        bands = ((c.xx + c.rng.uniform(0.3, 1.0) * c.yy) // width) % 2
        shade = 0.85 + 0.22 * bands + 0.12 * fine
    else:             # patchy: dry patches
        patches = c.noise(5, 5)
        dirt = np.asarray([150, 120, 70], np.float32) / np.maximum(base, 1)
        mix = np.clip((patches - 0.55) * 4, 0, 1)
        shade = (1 - mix[..., None]) * (0.85 + 0.2 * fine[..., None]) + mix[..., None] * dirt
        return (base * shade).astype(np.float32)
    return (base * shade[..., None]).astype(np.float32)


def _road(c: _Canvas) -> np.ndarray:
    base = c.colour(ROAD_COLOURS, jitter=12)
    fine = c.rng.standard_normal((c.size, c.size), dtype=np.float32)
    if c.rng.random() < 0.35:   # cobblestones: per-cell brightness and dark joints
        cell = int(c.rng.integers(8, 17)) * max(c.size // 224, 1)
        n = c.size // cell + 2
        grid = c.rng.uniform(0.8, 1.15, (n, n)).astype(np.float32)
        iy, ix = (c.yy // cell).astype(int), (c.xx // cell).astype(int)
        joint = ((c.yy % cell) < 2) | ((c.xx % cell) < 2)
        shade = grid[iy, ix] * np.where(joint, 0.6, 1.0) + 0.04 * fine
    else:                       # asphalt: grain and large stains
        shade = 1 + 0.08 * fine + 0.15 * (c.noise(4, 4) - 0.5)
    return (base * shade[..., None]).astype(np.float32)


def _building(c: _Canvas, bottom: float, height: float, width: float, x: float) -> None:
    top = bottom - height
    wall = c.colour(WALL_COLOURS)
    c.shape((top, bottom, x, x + width), BUILDING, wall)
    if c.rng.random() < 0.5:   # brick or panel joints in a lighter or darker tone
        step = max(3.0, height / c.rng.integers(12, 30))
        tone = wall * c.rng.choice([0.75, 1.2])
        c.shape((top, bottom, x, x + width), BUILDING, tone, grain=0.02,
                shape=lambda ys, xs: ((ys - top) % step) < 1.2)
    if c.rng.random() < 0.6:   # gable roof
        rh = height * c.rng.uniform(0.15, 0.35)
        c.shape((top - rh, top, x - 2, x + width + 2), BUILDING, c.colour(ROOF_COLOURS),
                shape=_triangle(top - rh, top, x + width / 2, width / 2 + 2))
    else:                      # flat roof rim
        c.shape((top, top + max(2, height * 0.05), x, x + width), BUILDING, c.colour(ROOF_COLOURS))
    rows, cols = int(c.rng.integers(2, 7)), int(c.rng.integers(2, 6))
    cw, ch = width / cols, (height * 0.85) / rows
    glass = [c.colour(WINDOW_COLOURS, 10) for _ in range(2)]
    for r in range(rows):
        for k in range(cols):
            y0, x0 = top + height * 0.08 + r * ch, x + k * cw
            c.shape((y0 + ch * 0.2, y0 + ch * 0.8, x0 + cw * 0.25, x0 + cw * 0.75), BUILDING,
                    glass[int(c.rng.integers(2))], grain=0.06)


def _tree(c: _Canvas, bottom: float, height: float, x: float) -> None:
    crown = c.colour(CROWN_COLOURS)
    trunk_w = height * c.rng.uniform(0.06, 0.12)
    trunk_h = height * c.rng.uniform(0.3, 0.5)
    c.shape((bottom - trunk_h, bottom, x - trunk_w / 2, x + trunk_w / 2), TREE, c.colour(TRUNK_COLOURS))
    top = bottom - height
    if c.rng.random() < 0.3:   # conifer: stacked triangles
        for k in range(3):
            t0 = top + k * height * 0.2
            half = height * (0.18 + 0.06 * k)
            c.shape((t0, t0 + height * 0.4, x - half, x + half), TREE, crown * (1 - 0.08 * k), grain=0.12,
                    shape=_triangle(t0, t0 + height * 0.4, x, half))
        return
    for _ in range(int(c.rng.integers(2, 5))):   # broadleaf: a few overlapping blobs
        ry = height * c.rng.uniform(0.2, 0.32)
        rx = ry * c.rng.uniform(0.8, 1.3)
        cy = top + ry + c.rng.uniform(0, height * 0.2)
        cx = x + c.rng.uniform(-0.3, 0.3) * rx
        tone = crown * c.rng.uniform(0.85, 1.15)
        c.shape((cy - ry, cy + ry, cx - rx, cx + rx), TREE, tone, grain=0.15, shape=_ellipse(cy, cx, ry, rx))


def _car(c: _Canvas, bottom: float, length: float, x: float) -> None:
    body = c.colour(CAR_COLOURS, 12)
    wheel_r = length * 0.12
    body_bottom = bottom - wheel_r * 0.6
    body_top = body_bottom - length * 0.25
    cabin_top = body_top - length * 0.2
    c.shape((body_top, body_bottom, x, x + length), CAR, body, grain=0.03)
    c.shape((cabin_top, body_top + 1, x, x + length), CAR, body, grain=0.03,
            shape=_trapezoid(cabin_top, body_top, x + length * 0.5, length * 0.24, length * 0.36))
    glass = c.colour([(70, 90, 110), (40, 50, 60), (140, 170, 190)], 10)
    inset = length * 0.04
    for side in (-1, 1):   # two side windows split by the pillar
        cx = x + length * (0.5 + side * 0.15)
        box = (cabin_top + inset, body_top - inset * 0.3, cx - length * 0.12, cx + length * 0.12)
        c.shape(box, CAR, glass,
                shape=_trapezoid(cabin_top + inset, body_top, x + length * 0.5, length * 0.2, length * 0.3))
    c.shape((cabin_top, body_top, x + length * 0.49, x + length * 0.51), CAR, body)
    c.shape((body_top + 2, body_top + length * 0.07, x + length * 0.93, x + length), CAR, (250, 235, 170))
    c.shape((body_top + 2, body_top + length * 0.07, x, x + length * 0.05), CAR, (200, 30, 30))
    for wx in (x + length * 0.2, x + length * 0.8):
        wy = bottom - wheel_r
        c.shape((wy - wheel_r, wy + wheel_r, wx - wheel_r, wx + wheel_r), CAR, (25, 25, 28),
                shape=_ellipse(wy, wx, wheel_r, wheel_r))
        hub = wheel_r * 0.45
        c.shape((wy - hub, wy + hub, wx - hub, wx + hub), CAR, (160, 160, 165),
                shape=_ellipse(wy, wx, hub, hub))


def _person(c: _Canvas, bottom: float, height: float, x: float) -> None:
    skin, shirt, trousers = c.colour(SKIN_COLOURS, 8), c.colour(SHIRT_COLOURS), c.colour(TROUSER_COLOURS, 10)
    leg_h, torso_h, head_r = height * 0.47, height * 0.33, height * 0.09
    leg_w, torso_w = height * 0.09, height * 0.26
    hip = bottom - leg_h
    for dx in (-leg_w * 1.05, leg_w * 0.05):
        c.shape((hip, bottom, x + dx, x + dx + leg_w), PERSON, trousers)
    shoulder = hip - torso_h
    c.shape((shoulder, hip + 1, x - torso_w / 2, x + torso_w / 2), PERSON, shirt, grain=0.05)
    for dx in (-torso_w / 2 - leg_w * 0.7, torso_w / 2):   # arms, sleeved or bare
        arm = shirt if c.rng.random() < 0.5 else skin
        c.shape((shoulder + 1, shoulder + torso_h * 0.95, x + dx, x + dx + leg_w * 0.7), PERSON, arm)
    cy = shoulder - head_r * 0.9
    head = _ellipse(cy, x, head_r, head_r)
    c.shape((cy - head_r, cy + head_r, x - head_r, x + head_r), PERSON, skin, shape=head)
    hair = c.colour(HAIR_COLOURS)
    c.shape((cy - head_r, cy - head_r * 0.3, x - head_r, x + head_r), PERSON, hair, shape=head)


def _ground(c: _Canvas, rng: np.random.Generator, horizon: float, hz_line: np.ndarray) -> None:
    """Below the horizon: 1-3 wavy bands of grass / water / road, then maybe a road running to the horizon."""
    S = float(c.size)
    n_bands = int(rng.integers(1, 4))
    cuts = np.sort(rng.uniform(horizon, S, n_bands - 1))
    classes, prev = [], -1
    for _ in range(n_bands):
        cls = int(rng.choice([k for k in (GRASS, WATER, ROAD) if k != prev]))
        classes.append(cls)
        prev = cls
    edges = [hz_line] + [cut + S * 0.02 * np.sin(2 * np.pi * (c.xx / S * rng.uniform(0.5, 3) + rng.random()))
                         for cut in cuts] + [np.full_like(c.xx, S + 1)]
    edges = list(np.maximum.accumulate(np.stack(edges), axis=0))   # bands never cross
    textures = {GRASS: lambda: _grass(c), WATER: lambda: _water(c, horizon), ROAD: lambda: _road(c)}
    for k, cls in enumerate(classes):
        band = (c.yy >= edges[k]) & (c.yy < edges[k + 1])
        c.region(band, textures[cls](), cls)
        if cls == ROAD:   # a dashed lane marking along the band
            mid = (edges[k] + edges[k + 1]) / 2
            dash = rng.uniform(0.04, 0.1) * S
            mark = band & (np.abs(c.yy - mid) < max(1.0, S * 0.006)) & ((c.xx // dash) % 2 == 0)
            c.region(mark, c.colour(PAINT_COLOURS, 8), ROAD)
    if rng.random() < 0.5:
        vx, bx, bw = S * rng.uniform(0.3, 0.7), S * rng.uniform(0.2, 0.8), S * rng.uniform(0.35, 0.8)
        t = np.clip((c.yy - horizon) / (S - horizon), 0, 1)
        cx, half = vx + (bx - vx) * t, S * 0.01 + (bw / 2 - S * 0.01) * t
        road = (c.yy >= horizon) & (np.abs(c.xx - cx) <= half)
        c.region(road, _road(c), ROAD)
        mark = road & (np.abs(c.xx - cx) <= half * 0.03 + 0.5) & (np.sin(2 * np.pi * 6 * np.sqrt(t)) > 0)
        c.region(mark, c.colour(PAINT_COLOURS, 8), ROAD)


def render_scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One scene: (H, W, 3) uint8 image and its exact (H, W) uint8 label map."""
    c = _Canvas(rng, size)
    S = float(size)
    horizon = S * rng.uniform(0.28, 0.55)
    hz_line = horizon + S * rng.uniform(0, 0.03) * np.sin(2 * np.pi * (c.xx / S * rng.uniform(0.5, 2)
                                                                        + rng.random()))
    c.region(np.broadcast_to(c.yy < hz_line, (size, size)), _sky(c, horizon), SKY)

    _ground(c, rng, horizon, hz_line)

    # buildings stand on the horizon, behind everything on the ground
    for _ in range(int(rng.integers(0, 5))):
        width, height = S * rng.uniform(0.08, 0.3), S * rng.uniform(0.12, 0.45)
        height = min(height, horizon - S * 0.04)
        if height > S * 0.05:
            _building(c, horizon + S * rng.uniform(0, 0.05), height, width, S * rng.uniform(-0.1, 1.0))

    # ground objects, far ones first so near ones occlude them; size grows towards the viewer
    objects = []
    for kind, most in ((_tree, 4), (_car, 3), (_person, 3)):
        for _ in range(int(rng.integers(0, most + 1))):
            bottom = rng.uniform(horizon + S * 0.03, S * 1.05)
            objects.append((bottom, kind, S * rng.uniform(-0.05, 0.95)))
    objects.sort(key=lambda o: o[0])
    for bottom, kind, x in objects:
        scale = 0.25 + 0.95 * (bottom - horizon) / (S - horizon)
        if kind is _tree:
            _tree(c, bottom, scale * S * rng.uniform(0.25, 0.5), x)
        elif kind is _car:
            _car(c, bottom, scale * S * rng.uniform(0.18, 0.32), x)
        else:
            _person(c, bottom, scale * S * rng.uniform(0.12, 0.25), x)

    # camera: white balance, exposure and sensor noise over the whole picture (labels unchanged)
    gain = rng.uniform(0.88, 1.12, 3) * rng.uniform(0.8, 1.2)
    rgb = c.rgb * gain.astype(np.float32) + 2.0 * rng.standard_normal(c.rgb.shape, np.float32)
    return np.clip(rgb, 0, 255).astype(np.uint8), c.lab
