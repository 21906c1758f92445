"""Writing a synthetic dataset in the exact SemanticKITTI layout.

``sequences/XX/{velodyne/NNNNNN.bin, labels/NNNNNN.label, image_2/NNNNNN.png, calib.txt,
poses.txt, times.txt}``; test sequences (11-21) get no labels, as in the real dataset.
Everything is drawn from ``numpy.random.default_rng((seed, sequence, ...))``, so a
(seed, sequence, frame) triple always gives the same files.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from ..calib import to_homogeneous, write_calib, write_poses
from ..errors import PathLike
from ..frames import normalise_sequence
from ..reader import write_label, write_scan
from .calibrations import calibration_for
from .camera import ImageQuality, render
from .lidar import SENSOR_HEIGHT, LidarModel, scan
from .scene import Scene, SceneConfig, build_street_scene, ego_lane_y

FRAME_DT = 0.1036  # s between KITTI scans (~10 Hz)


@dataclass
class SyntheticConfig:
    frames: int = 10
    seed: int = 0
    speed: float = 8.0               # m/s of the ego car
    lidar: LidarModel = field(default_factory=LidarModel)
    quality: ImageQuality = field(default_factory=ImageQuality)
    scene: SceneConfig = field(default_factory=SceneConfig)  # object density, ground remission contrast
    render_scale: float = 0.5        # image rays per pixel side (0.5: render half size, upsample)
    write_images: bool = True
    test_labels: bool = False        # write labels for 11-21 too (the real test set has none)


def synthetic_config(spec: Dict[str, Any]) -> SyntheticConfig:
    """A :class:`SyntheticConfig` from a config's ``data.synthetic`` mapping (nested
    ``lidar``, ``quality`` and ``scene`` mappings become :class:`LidarModel`,
    :class:`ImageQuality` and :class:`SceneConfig`)."""
    import dataclasses

    spec = {k: v for k, v in spec.items() if k != "sequences"}
    lidar = LidarModel(**(spec.pop("lidar", None) or {}))
    quality = ImageQuality(**(spec.pop("quality", None) or {}))
    scene = dict(spec.pop("scene", None) or {})
    known = {f.name for f in dataclasses.fields(SceneConfig)}
    if set(scene) - known:
        raise ValueError(f"data.synthetic.scene: unknown key(s) {sorted(set(scene) - known)}; known: {sorted(known)}")
    return SyntheticConfig(lidar=lidar, quality=quality, scene=SceneConfig(**scene), **spec)


@dataclass
class SyntheticFrame:
    points: np.ndarray        # (N, 4) float32
    semantic: np.ndarray      # (N,) uint32 raw ids
    instance: np.ndarray      # (N,) uint32
    image: Optional[np.ndarray]
    velo_pose: np.ndarray     # 4x4 world <- velodyne


class SyntheticSequence:
    """One sequence's scene, calibration and ego trajectory; frames on demand."""

    def __init__(self, sequence: str, cfg: SyntheticConfig):
        self.sequence = normalise_sequence(sequence)
        self.cfg = cfg
        self.calib, self.image_hw = calibration_for(self.sequence)
        seq_int = int(self.sequence)
        rng = np.random.default_rng((cfg.seed, seq_int, 0))
        travel = cfg.speed * FRAME_DT * max(cfg.frames - 1, 0)
        margin = cfg.lidar.max_range + 30.0
        x0 = float(rng.uniform(-1000, 1000))  # where along its street the sequence starts
        # objects added or dropped by the density knob come from a stream of their own, so the
        # rest of the street is drawn exactly as at density 1
        objects = np.random.default_rng((cfg.seed, seq_int, 2)) if cfg.scene.density != 1.0 else None
        self.scene: Scene = build_street_scene(rng, x0 - margin, x0 + travel + margin, ego_x0=x0, ego_speed=cfg.speed,
                                               config=cfg.scene, object_rng=objects)
        self.x0 = x0
        self.lane_y = ego_lane_y(self.scene.layout)
        self.wobble = rng.uniform(0, 2 * np.pi)

    def velo_pose(self, i: int) -> np.ndarray:
        yaw = 0.01 * np.sin(0.05 * i + self.wobble)
        pose = np.eye(4)
        pose[:3, :3] = [[np.cos(yaw), -np.sin(yaw), 0], [np.sin(yaw), np.cos(yaw), 0], [0, 0, 1]]
        pose[:3, 3] = [self.x0 + self.cfg.speed * FRAME_DT * i, self.lane_y + 0.1 * np.sin(0.03 * i), SENSOR_HEIGHT]
        return pose

    def frame(self, i: int) -> SyntheticFrame:
        rng = np.random.default_rng((self.cfg.seed, int(self.sequence), 1, i))
        pose = self.velo_pose(i)
        t = i * FRAME_DT
        points, sem, inst = scan(self.scene, pose, t, rng, self.cfg.lidar)
        image = None
        if self.cfg.write_images:
            image = render(self.scene, pose, t, to_homogeneous(self.calib["Tr"]), self.calib["P2"], self.image_hw,
                           rng, self.cfg.quality, self.cfg.render_scale, texture_seed=self.cfg.seed)
        return SyntheticFrame(points, sem, inst, image, pose)

    def frame_lidar_only(self, i: int):
        """(points, semantic, instance) of frame ``i`` without rendering the image."""
        rng = np.random.default_rng((self.cfg.seed, int(self.sequence), 1, i))
        return scan(self.scene, self.velo_pose(i), i * FRAME_DT, rng, self.cfg.lidar)

    def camera_poses(self) -> np.ndarray:
        """poses.txt content: camera-0 pose of each frame in the first frame's camera-0 frame."""
        tr = to_homogeneous(self.calib["Tr"])
        v0_inv = np.linalg.inv(self.velo_pose(0))
        return np.stack([tr @ v0_inv @ self.velo_pose(i) @ np.linalg.inv(tr) for i in range(self.cfg.frames)])


def generate_dataset(out: PathLike, sequences: Sequence[str] = ("00", "08"), cfg: Optional[SyntheticConfig] = None,
                     progress: bool = True) -> Dict[str, List[Path]]:
    """Write ``cfg.frames`` frames of each sequence under ``out/sequences``; returns scan paths."""
    import cv2
    from tqdm import tqdm

    cfg = cfg or SyntheticConfig()
    written: Dict[str, List[Path]] = {}
    for seq in sequences:
        s = SyntheticSequence(seq, cfg)
        root = Path(out) / "sequences" / s.sequence
        with_labels = int(s.sequence) <= 10 or cfg.test_labels
        for sub in ("velodyne",) + (("labels",) if with_labels else ()) + (("image_2",) if cfg.write_images else ()):
            (root / sub).mkdir(parents=True, exist_ok=True)
        # frames of an earlier, longer run would otherwise sit beside this run's and be read
        # as part of the sequence (poses.txt and times.txt would no longer match)
        for sub, ext in (("velodyne", ".bin"), ("labels", ".label"), ("image_2", ".png")):
            for old in (root / sub).glob(f"*{ext}") if (root / sub).is_dir() else ():
                if old.stem.isdigit() and int(old.stem) >= cfg.frames:
                    old.unlink()
        write_calib(root / "calib.txt", s.calib)
        write_poses(root / "poses.txt", s.camera_poses())
        np.savetxt(root / "times.txt", np.arange(cfg.frames) * FRAME_DT, fmt="%e")
        paths = []
        for i in tqdm(range(cfg.frames), desc=f"sequence {s.sequence}", disable=not progress or cfg.frames < 2,
                      unit="frame"):
            f = s.frame(i)
            name = f"{i:06d}"
            write_scan(root / "velodyne" / f"{name}.bin", f.points)
            if with_labels:
                write_label(root / "labels" / f"{name}.label", f.semantic, f.instance)
            if f.image is not None:
                cv2.imwrite(str(root / "image_2" / f"{name}.png"), f.image[:, :, ::-1])
            paths.append(root / "velodyne" / f"{name}.bin")
        written[s.sequence] = paths
    return written
