"""Procedural aerial-like scenes with land-cover labels (the default, embedded dataset).

Every quantity is a pure function of global pixel coordinates (col x, row y) and hashed lattice
values, so a scene is rendered block by block with memory that does not grow with its size, and
the same seed gives the same pixels on any machine. A scene is laid out like a town at the edge of
farmland:

- a road grid at a per-scene angle (some grid lines have roads, asphalt or dirt, of varying width);
  the cells between grid lines get a land use: urban lots, fields (crop or ploughed), forest, mixed;
- buildings are rectangles on lots aligned with the roads, with roofs in colours that are shared
  with roads (grey, dark) and bare soil (terracotta); gable roofs show two brightness halves;
- tree canopy and grass are both green and differ by texture (crown speckle and crown shadows vs.
  smooth grass with mowing or crop stripes); dry grass overlaps bare soil in colour;
- water is a meandering river and lakes, dark and smooth, easily confused with shadows;
- buildings and trees cast shadows along a per-scene sun direction (the ground keeps its class);
- each scene has its own illumination: per-channel gain (white balance), gamma, haze; then
  Gaussian sensor noise.

Classes (label values): 1 water, 2 tree canopy, 3 grass/field, 4 bare soil, 5 road, 6 building.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

CLASS_NAMES = {1: "water", 2: "tree canopy", 3: "grass/field", 4: "bare soil", 5: "road", 6: "building"}
WATER, TREE, GRASS, SOIL, ROAD, BUILDING = 1, 2, 3, 4, 5, 6

_M1, _M2, _M3 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _hash01(*keys) -> np.ndarray:
    """Uniform [0, 1) float64 from integer arrays/scalars (splitmix64 finaliser, wraps mod 2**64)."""
    with np.errstate(over="ignore"):
        h = np.uint64(0x12345678ABCDEF)
        for k in keys:
            h = (h ^ np.asarray(k, dtype=np.int64).astype(np.uint64)) * _M1
            h = (h ^ (h >> np.uint64(30))) * _M2
            h = (h ^ (h >> np.uint64(27))) * _M3
            h = h ^ (h >> np.uint64(31))
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def value_noise(rows: np.ndarray, cols: np.ndarray, cell: float, key: int) -> np.ndarray:
    """Smooth noise in [0, 1) on the grid rows x cols (1-D integer pixel coordinates), float32 (h, w).

    Lattice values at multiples of `cell` pixels are hashed from (lattice index, key), then
    interpolated with smoothstep weights; only the lattice points the block needs are hashed.
    """
    fy, fx = rows / cell, cols / cell
    iy, ix = np.floor(fy).astype(np.int64), np.floor(fx).astype(np.int64)
    ty, tx = fy - iy, fx - ix
    ty, tx = (ty * ty * (3 - 2 * ty)).astype(np.float32), (tx * tx * (3 - 2 * tx)).astype(np.float32)
    ly = np.arange(iy.min(), iy.max() + 2)
    lx = np.arange(ix.min(), ix.max() + 2)
    lattice = _hash01(ly[:, None], lx[None, :], key).astype(np.float32)
    jx = ix - lx[0]
    along_x = lattice[:, jx] * (1 - tx) + lattice[:, jx + 1] * tx
    jy = iy - ly[0]
    return along_x[jy] * (1 - ty)[:, None] + along_x[jy + 1] * ty[:, None]


def fbm(rows, cols, cells: tuple[float, ...], key: int) -> np.ndarray:
    """Sum of value-noise octaves (amplitude halves with each finer cell), rescaled to ~[0, 1]."""
    total, norm, amp = 0.0, 0.0, 1.0
    for i, cell in enumerate(cells):
        total = total + amp * value_noise(rows, cols, cell, key * 131 + i)
        norm += amp
        amp *= 0.5
    return total / norm


@dataclass(frozen=True)
class SceneStyle:
    """Per-scene random layout and appearance, drawn from (seed, scene index)."""

    angle: float            # road grid angle, radians
    spacing: float          # road grid spacing, pixels
    offset_u: float
    offset_v: float
    road_prob: float        # share of grid lines that carry a road
    lot: float              # building lot size, pixels
    sun_dx: float           # shadow direction (unit vector, pixels)
    sun_dy: float
    shadow_len: float       # building shadow length for the tallest building, pixels
    river: bool
    river_row: float
    river_amp: float
    river_period: float
    river_width: float
    lake_level: float
    gain: tuple[float, float, float]
    gamma: float
    haze: float
    water_rgb: tuple[float, float, float]
    key: int


def scene_style(seed: int, scene: int, size: int) -> SceneStyle:
    rng = np.random.default_rng([seed, scene, 0x5CE2E])
    sun = rng.uniform(0, 2 * math.pi)
    water = rng.choice([(28, 48, 62), (45, 62, 58), (62, 72, 55)])  # deep, green, turbid
    return SceneStyle(
        angle=float(rng.uniform(-math.pi / 4, math.pi / 4)),
        spacing=float(rng.uniform(110, 190)),
        offset_u=float(rng.uniform(0, 200)), offset_v=float(rng.uniform(0, 200)),
        road_prob=float(rng.uniform(0.45, 0.8)),
        lot=float(rng.uniform(22, 34)),
        sun_dx=math.cos(sun), sun_dy=math.sin(sun),
        shadow_len=float(rng.uniform(4, 10)),
        river=bool(rng.uniform() < 0.6),
        river_row=float(rng.uniform(0.2, 0.8) * size),
        river_amp=float(rng.uniform(10, 60)), river_period=float(rng.uniform(250, 600)),
        river_width=float(rng.uniform(14, 40)),
        lake_level=float(rng.uniform(0.72, 0.8)),
        gain=tuple(float(g) for g in rng.normal(1.0, 0.07, 3).clip(0.8, 1.2)),
        gamma=float(rng.uniform(0.85, 1.15)),
        haze=float(rng.uniform(0, 22)),
        water_rgb=tuple(float(c) for c in water),
        key=int(rng.integers(0, 2**31 - 1)),
    )


# Land uses of the road-grid cells.
URBAN, FIELD, FOREST, MIXED = 0, 1, 2, 3


def _grid(st: SceneStyle, y: np.ndarray, x: np.ndarray):
    """Rotated coordinates (u along one road direction, v along the other) and cell indices."""
    c, s = math.cos(st.angle), math.sin(st.angle)
    u = x * c + y * s - st.offset_u
    v = -x * s + y * c - st.offset_v
    cu, cv = np.floor(u / st.spacing), np.floor(v / st.spacing)
    return u, v, cu, cv


def _buildings(st: SceneStyle, y: np.ndarray, x: np.ndarray):
    """Building mask, per-pixel lot hash (roof style) and building height in [0.3, 1] at (y, x)."""
    u, v, cu, cv = _grid(st, y, x)
    use = _land_use(st, cu, cv)
    margin = 10.0
    lu, lv = u - cu * st.spacing - margin, v - cv * st.spacing - margin
    inner = st.spacing - 2 * margin
    inside_cell = (lu >= 0) & (lv >= 0) & (lu < inner) & (lv < inner)
    iu, iv = np.floor(lu / st.lot), np.floor(lv / st.lot)
    pu, pv = lu - iu * st.lot, lv - iv * st.lot
    h = _hash01(cu, cv, iu, iv, st.key + 7)
    h2 = _hash01(cu, cv, iu, iv, st.key + 8)
    present = np.where(use == URBAN, h < 0.8, np.where(use == MIXED, h < 0.25, False))
    wu, wv = st.lot * (0.5 + 0.4 * h2), st.lot * (0.5 + 0.4 * (1 - h2))
    ou, ov = (st.lot - wu) * 0.5, (st.lot - wv) * 0.5
    inside = (pu >= ou) & (pu < ou + wu) & (pv >= ov) & (pv < ov + wv)
    mask = present & inside & inside_cell & ((iu + 1) * st.lot <= inner) & ((iv + 1) * st.lot <= inner)
    # Gable roofs: the half of the roof on one side of the ridge (the long axis) is brighter.
    along_u = wu >= wv
    ridge_side = np.where(along_u, pv - ov < wv / 2, pu - ou < wu / 2)
    edge = np.minimum(np.minimum(pu - ou, ou + wu - pu), np.minimum(pv - ov, ov + wv - pv)) < 1.0
    height = 0.3 + 0.7 * _hash01(cu, cv, iu, iv, st.key + 9)
    return mask, h, ridge_side, edge, height


def _land_use(st: SceneStyle, cu: np.ndarray, cv: np.ndarray) -> np.ndarray:
    h = _hash01(cu, cv, st.key + 3)
    return np.select([h < 0.35, h < 0.7, h < 0.85], [URBAN, FIELD, FOREST], MIXED)


def render_block(seed: int, scene: int, size: int, row0: int, row1: int, noise_std: float,
                 style: SceneStyle | None = None, col0: int = 0, col1: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Pixels [row0, row1) x [col0, col1) of scene `scene`: (rgb uint8 (3, h, w), label uint8 (h, w)).

    Everything but the sensor noise is a function of global pixel coordinates; the noise stream is
    keyed by (seed, scene, row0, col0), so a scene is reproducible for a fixed block layout.
    """
    st = style or scene_style(seed, scene, size)
    col1 = size if col1 is None else col1
    rows = np.arange(row0, row1, dtype=np.float64)
    cols = np.arange(col0, col1, dtype=np.float64)
    y, x = np.meshgrid(rows, cols, indexing="ij")
    k = st.key
    u, v, cu, cv = _grid(st, y, x)
    use = _land_use(st, cu, cv)

    # Roads: the nearest grid line in each direction, if it carries a road.
    def road_along(coord, salt):
        line = np.round(coord / st.spacing)
        dist = np.abs(coord - line * st.spacing)
        hl = _hash01(line, k + salt)
        exists = hl < st.road_prob
        width = 5 + 9 * _hash01(line, k + salt + 1)
        dirt = _hash01(line, k + salt + 2) < 0.25
        return exists & (dist < width / 2), dirt, dist, width

    road_u, dirt_u, dist_u, width_u = road_along(u, 11)
    road_v, dirt_v, dist_v, width_v = road_along(v, 21)
    road = road_u | road_v
    dirt = np.where(road_u, dirt_u, dirt_v)
    centre_line = ((road_u & (dist_u < 0.8) & (width_u > 10) & ~dirt_u & (np.mod(v, 14) < 7))
                   | (road_v & (dist_v < 0.8) & (width_v > 10) & ~dirt_v & (np.mod(u, 14) < 7)))

    # Water: a meandering river and lakes (outside built-up cells).
    water = np.zeros(y.shape, dtype=bool)
    if st.river:
        wobble = 25 * (fbm(rows, cols, (97.0,), k + 31) - 0.5)
        centre = st.river_row + st.river_amp * np.sin(2 * math.pi * x / st.river_period) + wobble
        water |= np.abs(y - centre) < st.river_width / 2
    lakes = fbm(rows, cols, (180.0, 90.0), k + 37)
    water |= (lakes > st.lake_level) & (use != URBAN) & (use != MIXED)

    # Trees: canopy noise, dense in forests, clumps elsewhere, street trees in towns.
    tree_n = fbm(rows, cols, (40.0, 18.0, 8.0), k + 41)
    tree_level = np.select([use == FOREST, use == MIXED, use == URBAN], [0.38, 0.55, 0.66], 0.7)
    trees = tree_n > tree_level

    # Buildings on the block plus a halo as wide as the longest shadow, so shadows are array shifts.
    halo = int(math.ceil(st.shadow_len)) + 1
    ey, ex = np.meshgrid(np.arange(row0 - halo, row1 + halo, dtype=np.float64),
                         np.arange(col0 - halo, col1 + halo, dtype=np.float64), indexing="ij")
    bld_ext, roof_h_ext, ridge_ext, edge_ext, height_ext = _buildings(st, ey, ex)
    h, w = row1 - row0, col1 - col0

    def shifted(a, dy=0, dx=0):
        """a[p - (dy, dx)] for every pixel p of the block."""
        return a[halo - dy:halo - dy + h, halo - dx:halo - dx + w]

    bld, roof_h, ridge, roof_edge = (shifted(a) for a in (bld_ext, roof_h_ext, ridge_ext, edge_ext))

    # Ground: grass vs bare soil per cell and per noise (ploughed fields, construction sites).
    soil_n = fbm(rows, cols, (70.0, 25.0), k + 51)
    cell_h = _hash01(cu, cv, k + 5)
    soil = np.where(use == FIELD, cell_h < 0.45, soil_n > 0.62)

    label = np.where(soil, SOIL, GRASS).astype(np.uint8)
    label[trees] = TREE
    label[water] = WATER
    label[road] = ROAD
    label[bld] = BUILDING

    # ---------------- appearance ----------------
    fine = value_noise(rows, cols, 2.5, k + 61)
    mid = fbm(rows, cols, (12.0, 6.0), k + 62)
    low = fbm(rows, cols, (120.0, 60.0), k + 63)
    rgb = np.empty((3,) + y.shape, dtype=np.float32)

    def paint(mask, base, tex):
        for c in range(3):
            rgb[c][mask] = (base[c] * tex)[mask] if np.ndim(base[c]) else base[c] * tex[mask]

    # Grass / field: green to dry yellow, smooth, stripes along the cell's orientation.
    dry = np.clip(low * 1.6 - 0.45 + 0.5 * (cell_h > 0.8), 0, 1)
    stripe_dir = np.where(_hash01(cu, cv, k + 6) < 0.5, u, v)
    period = 5 + 6 * _hash01(cu, cv, k + 4)
    stripes = np.where(use == FIELD, 0.07, 0.025) * np.sin(2 * math.pi * stripe_dir / period)
    grass_tex = 0.95 + 0.1 * mid + stripes + 0.03 * fine
    grass_rgb = (88 + 62 * dry, 118 + 22 * dry, 58 + 40 * dry)
    paint(label == GRASS, grass_rgb, grass_tex)
    # Bare soil: brown to grey-brown, furrows in ploughed fields, mottled elsewhere.
    grey = _hash01(cu, cv, k + 9)
    soil_rgb = (150 - 25 * grey, 120 - 5 * grey, 88 + 12 * grey)
    soil_tex = 0.88 + 0.22 * mid + np.where(use == FIELD, 0.08, 0.02) * np.sin(2 * math.pi * stripe_dir / 4.0)
    paint(label == SOIL, soil_rgb, soil_tex)
    # Tree canopy: dark green with bright crowns and dark gaps (high-frequency texture).
    crowns = value_noise(rows, cols, 4.0, k + 71)
    tree_tex = 0.55 + 0.75 * crowns ** 1.5 + 0.15 * (tree_n - tree_level)
    tree_rgb = (52 + 10 * low, 78 + 10 * low, 42 + 5 * low)
    paint(label == TREE, tree_rgb, tree_tex)
    # Water: smooth, slightly varying turbidity, rare glints.
    water_tex = 0.92 + 0.16 * low + 0.02 * fine
    paint(label == WATER, st.water_rgb, water_tex)
    # Roads: asphalt (grey) or dirt (soil-like), worn centre, white dashes.
    road_rgb = (np.where(dirt, 148, 92), np.where(dirt, 124, 94), np.where(dirt, 92, 98))
    road_tex = 0.93 + 0.1 * mid + 0.04 * fine
    paint(label == ROAD, road_rgb, road_tex)
    dash = centre_line & (label == ROAD)
    rgb[:, dash] = 215
    # Roofs: grey concrete / dark / terracotta / white, gable halves, dark eaves.
    roof_rgb = np.select([roof_h < 0.3, roof_h < 0.5, roof_h < 0.72],
                         [np.float32(120), np.float32(68), np.float32(152)], np.float32(205))
    roof_g = np.select([roof_h < 0.3, roof_h < 0.5, roof_h < 0.72], [120, 70, 92], 203)
    roof_b = np.select([roof_h < 0.3, roof_h < 0.5, roof_h < 0.72], [118, 76, 72], 196)
    gable = np.where(_hash01(roof_h * 1e6, k) < 0.6, np.where(ridge, 1.1, 0.86), 1.0)
    roof_tex = gable * (0.97 + 0.05 * fine) * np.where(roof_edge, 0.75, 1.0)
    paint(label == BUILDING, (roof_rgb, roof_g, roof_b), roof_tex)

    # Shadows: buildings (sampled along the sun direction, taller ones cast longer shadows)
    # and trees; the ground under a shadow keeps its class.
    shadow = np.zeros(y.shape, dtype=bool)
    steps = int(math.ceil(st.shadow_len))
    for n in range(1, steps + 1):  # one sample per pixel of shadow length
        frac = n / steps
        dy, dx = int(round(frac * st.shadow_len * st.sun_dy)), int(round(frac * st.shadow_len * st.sun_dx))
        shadow |= shifted(bld_ext, dy, dx) & (shifted(height_ext, dy, dx) >= frac)
    tree_shift = 4.0
    sy, sx = int(round(tree_shift * st.sun_dy)), int(round(tree_shift * st.sun_dx))
    trees_shifted = fbm(rows - sy, cols - sx, (40.0, 18.0, 8.0), k + 41) > tree_level
    shadow |= trees_shifted & (label != TREE)
    shadow &= ~bld
    rgb[:, shadow] *= np.array([0.42, 0.45, 0.55], dtype=np.float32)[:, None]

    # Illumination: white balance, gamma, haze; then sensor noise.
    gain = np.array(st.gain, dtype=np.float32)[:, None, None]
    rgb = 255.0 * (np.clip(rgb * gain, 0, 255) / 255.0) ** st.gamma
    rgb = rgb + st.haze * np.array([0.8, 0.9, 1.1], dtype=np.float32)[:, None, None]
    if noise_std > 0:
        rng = np.random.default_rng([seed, scene, row0, col0, 0xB10C])
        rgb = rgb + rng.standard_normal(rgb.shape, dtype=np.float32) * np.float32(noise_std)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8), label


BLOCK_COLS = 512  # rendered in 512-px wide pieces: the temporaries stay cache-sized


def render_scene(seed: int, scene: int, size: int, noise_std: float, block_rows: int = 256):
    """Yield (row0, rgb (3, h, size) uint8, label (h, size) uint8) blocks of one scene."""
    style = scene_style(seed, scene, size)
    for row0 in range(0, size, block_rows):
        row1 = min(size, row0 + block_rows)
        pieces = [render_block(seed, scene, size, row0, row1, noise_std, style, c, min(size, c + BLOCK_COLS))
                  for c in range(0, size, BLOCK_COLS)]
        yield row0, np.concatenate([p[0] for p in pieces], axis=2), np.concatenate([p[1] for p in pieces], axis=1)
