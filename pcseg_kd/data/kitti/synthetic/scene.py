"""Procedural street scenes: a straight street with lanes, parking, sidewalks, terrain,
buildings, fences, vegetation, poles, signs, parked and moving vehicles, pedestrians and
cyclists. World frame: x along the street, y to the left, z up, ground at z = 0.

A scene is built once per sequence from its own random generator; moving objects follow
``centre + velocity * time``, so every frame of a sequence sees the same world.

Two knobs (:class:`SceneConfig`, ``data.synthetic.scene``) set how much the LiDAR alone can
see: ``density`` scales how many objects (vehicles, pedestrians, cyclists and parked
bicycles, poles, signs) a street holds, ``ground_remission_contrast`` how far apart the
ground materials' remissions lie. Both at 1.0 give the generator's original output bit for
bit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import numpy as np

from .materials import material_of

SIDEWALK_HEIGHT = 0.15
GROUND_CLASSES = (40, 44, 48, 72)  # road, parking, sidewalk, terrain: told apart by remission and small steps
GROUND_REMISSION_MEAN = float(np.mean([material_of(c).remission for c in GROUND_CLASSES]))


@dataclass
class SceneConfig:
    """``density``: multiplies the expected number of objects of every kind that can be rare
    in a scan (vehicles parked and in traffic, pedestrians, cyclists and parked bicycles,
    street-light poles, signs). Above 1 the original objects stay where they are and an
    independent Poisson layer of (density - 1) times their rate is added (a superposition of
    Poisson processes is one of the summed rate); below 1 each original object is kept with
    probability ``density`` (thinning). Either way the extra draws come from their own
    random stream, so the street, buildings, vegetation and every other draw stay the same.
    Parked cars are only added where a parking gap is free, so their count saturates.

    ``ground_remission_contrast``: the remission the LiDAR reports for road, parking,
    sidewalk and terrain, ``m + c * (r - m)`` with ``r`` the surface's reflectivity and ``m``
    the four materials' mean: 0 makes them indistinguishable by remission (only the
    sidewalk's 15 cm step and terrain's roughness remain), above 1 easier. It changes the
    reported remission only: which returns are lost (dark surfaces at range) is decided on the
    surface's own reflectivity, so the points and labels are those of contrast 1.
    """

    density: float = 1.0
    ground_remission_contrast: float = 1.0

    def __post_init__(self) -> None:
        for key in ("density", "ground_remission_contrast"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"data.synthetic.scene.{key}: must be a finite number >= 0, got {v!r}")
            setattr(self, key, float(v))


@dataclass
class Prim:
    """One primitive. ``size``: box half-extents; cylinder (radius, radius, half-height);
    ellipsoid radii. ``centre`` is at time 0."""

    kind: str
    centre: np.ndarray
    size: np.ndarray
    label: int
    instance: int
    colour: np.ndarray
    remission: float
    yaw: float = 0.0
    velocity: np.ndarray = field(default_factory=lambda: np.zeros(3))

    @property
    def bound_radius(self) -> float:
        return float(np.max(self.size) if self.kind == "ell" else np.linalg.norm(self.size))


@dataclass
class Layout:
    """The ground: road |y| <= road_hw, then per side (index 0: right y<0, 1: left y>0) an
    optional parking lane in some x-intervals, the raised sidewalk and terrain beyond."""

    road_hw: float
    parking_w: Tuple[float, float]
    parking_spans: Tuple[List[Tuple[float, float]], List[Tuple[float, float]]]
    sidewalk_w: Tuple[float, float]
    two_way: bool

    def curb(self, side: int) -> float:
        return self.road_hw + self.parking_w[side]

    def ground_label(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Raw label of the ground plane at (x, y) (the raised sidewalk is a separate box)."""
        ay = np.abs(y)
        side = (y > 0).astype(int)
        curb = self.road_hw + np.asarray(self.parking_w)[side]
        lab = np.where(ay <= curb, 40, 72)
        park = np.zeros_like(ay, dtype=bool)
        for s in (0, 1):
            for x0, x1 in self.parking_spans[s]:
                park |= (side == s) & (ay > self.road_hw) & (ay <= curb) & (x >= x0) & (x < x1)
        lab = np.where(park, 44, lab)
        edge = np.abs(ay - (self.road_hw - 0.3)) < 0.075
        centre = (np.abs(y) < 0.075) & (np.mod(x, 6.0) < 3.0) if self.two_way else np.zeros_like(edge)
        lab = np.where((edge | centre) & (ay <= self.road_hw), 60, lab)
        return lab


@dataclass
class Scene:
    layout: Layout
    prims: List[Prim]
    sun_dir: np.ndarray
    sun_strength: float
    ground_colour_var: np.ndarray  # per ground class small random colour offset
    ground_remission_contrast: float = 1.0  # see SceneConfig

    def __post_init__(self) -> None:
        self.centres = np.array([p.centre for p in self.prims]).reshape(-1, 3)
        self.velocities = np.array([p.velocity for p in self.prims]).reshape(-1, 3)
        self.radii = np.array([p.bound_radius for p in self.prims])
        self.labels = np.array([p.label for p in self.prims], dtype=np.int64)
        self.instances = np.array([p.instance for p in self.prims], dtype=np.int64)
        self.colours = np.array([p.colour for p in self.prims]).reshape(-1, 3)
        self.remissions = np.array([p.remission for p in self.prims])

    def centres_at(self, time: float) -> np.ndarray:
        return self.centres + self.velocities * time


class _Builder:
    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.prims: List[Prim] = []
        self.next_instance = 1

    def instance(self) -> int:
        self.next_instance += 1
        return self.next_instance - 1

    def colour(self, label: int) -> np.ndarray:
        pal = material_of(label).palette
        base = np.array(pal[self.rng.integers(len(pal))])
        return np.clip(base * self.rng.uniform(0.85, 1.15) + self.rng.normal(0, 0.02, 3), 0, 1)

    def remission(self, label: int) -> float:
        m = material_of(label)
        return float(np.clip(self.rng.normal(m.remission, m.remission_std), 0.02, 0.99))

    def add(self, kind, centre, size, label, instance=0, yaw=0.0, velocity=None, colour=None, remission=None):
        self.prims.append(Prim(kind, np.asarray(centre, float), np.asarray(size, float), label, instance,
                               self.colour(label) if colour is None else np.asarray(colour, float),
                               self.remission(label) if remission is None else remission, yaw,
                               np.zeros(3) if velocity is None else np.asarray(velocity, float)))

    # -- things ------------------------------------------------------------------------------
    def car(self, x, y, yaw, speed=0.0, truck=False):
        moving = speed != 0.0
        label = (258 if moving else 18) if truck else (252 if moving else 10)
        inst = self.instance()
        vel = np.array([np.cos(yaw), np.sin(yaw), 0.0]) * speed
        col, rem = self.colour(label), self.remission(label)
        if truck:
            length, width = self.rng.uniform(6.5, 10), self.rng.uniform(2.3, 2.6)
            box_h = self.rng.uniform(2.8, 3.6)
            back = np.array([x, y, 0]) - np.array([np.cos(yaw), np.sin(yaw), 0]) * 0.9
            self.add("box", back + [0, 0, 0.5 + box_h / 2], [length / 2 - 0.9, width / 2, box_h / 2], label, inst, yaw, vel, col, rem)
            cab = np.array([x, y, 0]) + np.array([np.cos(yaw), np.sin(yaw), 0]) * (length / 2 - 0.9)
            self.add("box", cab + [0, 0, 1.45], [0.9, width / 2 - 0.05, 1.2], label, inst, yaw, vel, self.colour(label), rem)
        else:
            length, width, height = self.rng.uniform(3.8, 4.8), self.rng.uniform(1.7, 1.9), self.rng.uniform(1.4, 1.6)
            self.add("box", [x, y, 0.2 + 0.35], [length / 2, width / 2, 0.35], label, inst, yaw, vel, col, rem)
            glass = col * 0.35 + 0.05
            self.add("box", [x - 0.2 * np.cos(yaw), y - 0.2 * np.sin(yaw), 0.9 + (height - 0.9) / 2],
                     [length * 0.3, width / 2 - 0.08, (height - 0.9) / 2], label, inst, yaw, vel, glass, rem * 0.8)

    def person(self, x, y, speed=0.0, heading=0.0):
        label = 254 if speed else 30
        inst = self.instance()
        vel = np.array([np.cos(heading), np.sin(heading), 0.0]) * speed
        h = self.rng.uniform(1.55, 1.9)
        r = self.rng.uniform(0.18, 0.26)
        self.add("cyl", [x, y, (h - 0.25) / 2], [r, r, (h - 0.25) / 2], label, inst, velocity=vel)
        skin = np.array([0.85, 0.65, 0.5]) * self.rng.uniform(0.5, 1.1)
        self.add("ell", [x, y, h - 0.12], [0.11, 0.11, 0.13], label, inst, velocity=vel, colour=np.clip(skin, 0, 1))

    def cyclist(self, x, y, speed, heading=0.0):
        label = 253 if speed else 31
        inst = self.instance()
        vel = np.array([np.cos(heading), np.sin(heading), 0.0]) * speed
        self.add("box", [x, y, 0.5], [0.85, 0.08, 0.45], label, inst, heading, vel)
        self.add("cyl", [x - 0.1, y, 1.35], [0.2, 0.2, 0.4], label, inst, velocity=vel)
        self.add("ell", [x - 0.05, y, 1.85], [0.12, 0.12, 0.13], label, inst, velocity=vel)

    def tree(self, x, y):
        h = self.rng.uniform(2.0, 4.0)
        r = self.rng.uniform(0.12, 0.3)
        self.add("cyl", [x, y, h / 2], [r, r, h / 2], 71)
        rad = self.rng.uniform([1.5, 1.5, 1.3], [3.2, 3.2, 3.0])
        self.add("ell", [x, y, h + rad[2] * 0.7], rad, 70)

    def pole(self, x, y, sign=False):
        h = self.rng.uniform(5.0, 8.0) if not sign else self.rng.uniform(2.5, 3.3)
        self.add("cyl", [x, y, h / 2], [0.09, 0.09, h / 2], 80)
        if sign:
            s = self.rng.uniform(0.3, 0.45)
            self.add("box", [x, y, h - s], [0.03, s, s], 81, yaw=self.rng.normal(0, 0.1))

    def bicycle(self, x, y):
        self.add("box", [x, y, 0.5], [0.85, 0.05, 0.45], 11, self.instance())

    # -- randomly placed objects (one place and its attributes per call) -----------------------
    def random_pedestrian(self, x_min, x_max, sign, curb, sw):
        rng = self.rng
        px, py = rng.uniform(x_min, x_max), sign * (curb + rng.uniform(0.4, sw - 0.3))
        walking = rng.random() < 0.6
        self.person(px, py, speed=float(rng.uniform(0.8, 1.6)) if walking else 0.0,
                    heading=0.0 if rng.random() < 0.5 else np.pi)

    def random_traffic(self, x_min, x_max, layout, ego_x0, ego_speed, oncoming_speed, taken):
        """A vehicle in a lane (right lane with us, left lane oncoming), unless it would overlap
        one already in that lane (``taken``: (x at time 0, lane y) of traffic so far)."""
        rng = self.rng
        oncoming = layout.two_way and rng.random() < 0.5
        if oncoming:
            x, y, heading, speed = float(rng.uniform(x_min, x_max)), layout.road_hw / 2, np.pi, oncoming_speed
        else:  # in our lane, at our speed, 10-60 m ahead or behind
            gap = float(rng.uniform(10, 60)) * (1 if rng.random() < 0.6 else -1)
            x, y, heading, speed = ego_x0 + gap, ego_lane_y(layout), 0.0, ego_speed
        if any(abs(x - tx) < 14.0 and abs(y - ty) < 1.0 for tx, ty in taken):
            return  # same-lane traffic keeps its gap
        taken.append((x, y))
        self.car(x, y, heading + float(rng.normal(0, 0.005)), speed=speed, truck=rng.random() < 0.12)

    def random_cyclist(self, x_min, x_max, road_hw):
        rng = self.rng
        heading = 0.0 if rng.random() < 0.5 else np.pi
        self.cyclist(float(rng.uniform(x_min, x_max)), (-1 if heading == 0 else 1) * (road_hw - 0.8),
                     speed=float(rng.uniform(3, 6)), heading=heading)


def ego_lane_y(layout: Layout) -> float:
    return -layout.road_hw / 2 if layout.two_way else 0.0


def build_street_scene(rng: np.random.Generator, x_min: float, x_max: float,
                       ego_x0: float = 0.0, ego_speed: float = 0.0, config: Optional[SceneConfig] = None,
                       object_rng: Optional[np.random.Generator] = None) -> Scene:
    """A street covering ``x_min..x_max``. The ego vehicle drives in the right lane from
    ``ego_x0`` at ``ego_speed``; traffic in its lane keeps its speed and a safe gap.

    ``config``: the :class:`SceneConfig` knobs; a density other than 1 draws its extra or
    dropped objects from ``object_rng`` (required then), never from ``rng``."""
    config = config or SceneConfig()
    density = config.density
    if density != 1.0 and object_rng is None:
        raise ValueError("build_street_scene: a density other than 1 needs its own object_rng")
    b = _Builder(rng)

    def thinned(place: Callable[[], None]) -> None:
        """Place an original object (its draws from ``rng`` happen regardless, so everything
        drawn after it is unchanged); below density 1 drop it with probability 1 - density."""
        n = len(b.prims)
        place()
        if density < 1.0 and not object_rng.random() < density:
            del b.prims[n:]

    two_way = bool(rng.random() < 0.8)
    road_hw = float(rng.uniform(3.5, 4.5) if two_way else rng.uniform(2.8, 3.6))
    parking_w = tuple(float(rng.choice([0.0, 2.3])) for _ in range(2))
    sidewalk_w = tuple(float(rng.uniform(1.8, 4.0)) for _ in range(2))
    spans: Tuple[List, List] = ([], [])
    x = x_min
    while x < x_max:  # parking sections and gaps alternate along each side
        for s in (0, 1):
            if parking_w[s] and rng.random() < 0.6:
                spans[s].append((x, x + float(rng.uniform(15, 45))))
        x += float(rng.uniform(30, 60))
    layout = Layout(road_hw, parking_w, spans, sidewalk_w, two_way)
    length = x_max - x_min
    mid = (x_min + x_max) / 2
    sides = []  # per side, for the extra objects of density > 1: where they go and the original rates

    for s, sign in ((0, -1.0), (1, 1.0)):
        curb = layout.curb(s)
        sw = sidewalk_w[s]
        # raised sidewalk: one long slab per side
        b.add("box", [mid, sign * (curb + sw / 2), SIDEWALK_HEIGHT / 2], [length / 2, sw / 2, SIDEWALK_HEIGHT / 2], 48)
        back = curb + sw  # terrain starts here
        setback = float(rng.uniform(2.0, 9.0))
        # buildings along the side, separated by gaps of terrain
        x = x_min
        while x < x_max:
            lx = float(rng.uniform(8, 28))
            depth = float(rng.uniform(8, 16))
            height = float(rng.uniform(5, 22))
            off = back + setback + float(rng.uniform(-0.5, 1.5))
            b.add("box", [x + lx / 2, sign * (off + depth / 2), height / 2], [lx / 2, depth / 2, height / 2], 50,
                  yaw=float(rng.normal(0, 0.01)))
            x += lx + float(rng.uniform(0.5, 10))
        # fences in front of some buildings
        x = x_min
        while x < x_max:
            lx = float(rng.uniform(5, 25))
            if rng.random() < 0.4 and setback > 2.5:
                hgt = float(rng.uniform(0.8, 2.0))
                b.add("box", [x + lx / 2, sign * (back + setback - 0.6), hgt / 2], [lx / 2, 0.04, hgt / 2], 51)
            x += lx + float(rng.uniform(2, 20))
        # trees and bushes in the terrain strip, street lights and signs on the sidewalk
        for x in np.arange(x_min, x_max, float(rng.uniform(7, 14))):
            if rng.random() < 0.7 and setback > 3.0:
                b.tree(x + rng.uniform(-2, 2), sign * (back + rng.uniform(1.2, setback - 1.5)))
            if rng.random() < 0.3 and setback > 2.0:
                rad = rng.uniform([0.6, 0.6, 0.4], [1.6, 1.6, 0.9])
                b.add("ell", [x + rng.uniform(0, 5), sign * (back + rng.uniform(0.6, setback - 0.6)), rad[2] * 0.6], rad, 70)
        poles = np.arange(x_min + rng.uniform(0, 20), x_max, float(rng.uniform(20, 35)))
        for x in poles:
            thinned(lambda: b.pole(x, sign * (curb + 0.4)))
        signs = np.arange(x_min + rng.uniform(0, 40), x_max, float(rng.uniform(35, 70)))
        for x in signs:
            thinned(lambda: b.pole(x, sign * (curb + 0.5), sign=True))
        slots = np.arange(x_min, x_max, float(rng.uniform(25, 50)))
        for x in slots:
            if rng.random() < 0.5:
                b.add("box", [x, sign * (curb + sw - 0.5), 0.55], [0.3, 0.3, 0.4], 99)
            if rng.random() < 0.3:
                thinned(lambda: b.bicycle(x + 3, sign * (curb + sw - 0.3)))
        # parked cars in the parking spans, pedestrians on the sidewalk
        parked, parked_slots = [], 0.0
        for x0, x1 in spans[s]:
            cars = np.arange(x0 + 3, x1 - 3, float(rng.uniform(5.5, 8)))
            parked_slots += 0.8 * len(cars)
            for x in cars:
                if rng.random() < 0.8:
                    parked.append(x)
                    thinned(lambda: b.car(x, sign * (layout.road_hw + 1.15), float(rng.normal(0, 0.03)),
                                          truck=rng.random() < 0.07))
        for _ in range(int(rng.poisson(length / 25))):
            thinned(lambda: b.random_pedestrian(x_min, x_max, sign, curb, sw))
        sides.append(dict(sign=sign, curb=curb, sw=sw, poles=len(poles), signs=len(signs),
                          bicycles=0.3 * len(slots), parked=parked, parked_slots=parked_slots))
    # traffic: vehicles in the lanes (right lane with us, left lane oncoming)
    oncoming_speed = float(rng.uniform(5, 12))  # one speed per lane, so vehicles never drive through each other
    taken: List[Tuple[float, float]] = []  # (x at time 0, lane y) of traffic so far
    for _ in range(int(rng.poisson(length / 30)) + 1):
        thinned(lambda: b.random_traffic(x_min, x_max, layout, ego_x0, ego_speed, oncoming_speed, taken))
    for _ in range(int(rng.poisson(length / 120))):
        thinned(lambda: b.random_cyclist(x_min, x_max, road_hw))
    if density > 1.0:
        _add_objects(b, object_rng, density - 1.0, x_min, x_max, layout, sides, ego_x0, ego_speed, oncoming_speed, taken)
    sun_az, sun_el = rng.uniform(0, 2 * np.pi), rng.uniform(0.3, 1.2)
    sun = np.array([np.cos(sun_el) * np.cos(sun_az), np.cos(sun_el) * np.sin(sun_az), np.sin(sun_el)])
    return Scene(layout, b.prims, sun, float(rng.uniform(0.6, 1.0)), rng.normal(0, 0.03, (3,)),
                 config.ground_remission_contrast)


def _add_objects(b: _Builder, rng: np.random.Generator, extra: float, x_min: float, x_max: float, layout: Layout,
                 sides: List[dict], ego_x0: float, ego_speed: float, oncoming_speed: float,
                 taken: List[Tuple[float, float]]) -> None:
    """The layer of ``extra`` times the original objects' expected numbers (density - 1),
    placed as the originals are, every draw from ``rng``; appended after every original
    primitive (so those keep their indices and instance ids)."""
    ob = _Builder(rng)
    ob.prims, ob.next_instance = b.prims, b.next_instance
    length = x_max - x_min
    for side in sides:
        sign, curb, sw = side["sign"], side["curb"], side["sw"]
        for _ in range(int(rng.poisson(extra * side["poles"]))):
            ob.pole(float(rng.uniform(x_min, x_max)), sign * (curb + 0.4))
        for _ in range(int(rng.poisson(extra * side["signs"]))):
            ob.pole(float(rng.uniform(x_min, x_max)), sign * (curb + 0.5), sign=True)
        for _ in range(int(rng.poisson(extra * side["bicycles"]))):
            ob.bicycle(float(rng.uniform(x_min, x_max)), sign * (curb + sw - 0.3))
        for _ in range(int(rng.poisson(extra * side["parked_slots"]))):
            spans = layout.parking_spans[0 if sign < 0 else 1]
            x0, x1 = spans[int(rng.integers(len(spans)))]
            x = float(rng.uniform(x0 + 3, x1 - 3)) if x1 - x0 > 6 else None
            if x is None or any(abs(x - px) < 5.0 for px in side["parked"]):
                continue  # no free gap there: parking saturates
            side["parked"].append(x)
            ob.car(x, sign * (layout.road_hw + 1.15), float(rng.normal(0, 0.03)), truck=rng.random() < 0.07)
        for _ in range(int(rng.poisson(extra * length / 25))):
            ob.random_pedestrian(x_min, x_max, sign, curb, sw)
    for _ in range(int(rng.poisson(extra * (length / 30 + 1)))):
        ob.random_traffic(x_min, x_max, layout, ego_x0, ego_speed, oncoming_speed, taken)
    for _ in range(int(rng.poisson(extra * length / 120))):
        ob.random_cyclist(x_min, x_max, layout.road_hw)
    b.next_instance = ob.next_instance
