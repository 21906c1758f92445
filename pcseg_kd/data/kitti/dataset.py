"""The SemanticKITTI dataset: one frame -> points, labels, image, pixel correspondences, voxels.

Reads the official layout (``sequences/XX/{velodyne,labels,image_2,calib.txt}``); the
synthetic generator writes the same layout, so both go through this class unchanged.
"""
from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from ...registry import DATASETS
from .augment import IMAGENET_MEAN, IMAGENET_STD, ImageAugmentor, PointAugmentor
from .calib import lidar_to_image_matrix, read_calib
from .errors import BadFrameLog, KittiDataError
from .frames import Frame, list_frames
from .frames import split_sequences as sequences_of_split
from .labels import DEFAULT_IGNORE_INDEX, LabelMap
from .projection import project_to_image
from .reader import read_image, read_image_size, read_label, read_scan
from .voxelize import voxelize

DEFAULT_VOXEL_SIZE = [0.05, 0.05, 0.05]
DEFAULT_POINT_RANGE = [-51.2, -51.2, -4.0, 51.2, 51.2, 2.4]


def check_dataset_options(voxel_size=None, point_range=None, image_crop_hw=None, image_scale: float = 1.0,
                          max_frames=None, frame_stride: int = 1, out_of_range: str = "clip") -> None:
    """The option values that make no sense, as one ValueError naming each option (also run
    when an experiment's config loads, before any data is read)."""
    problems = []
    def numbers(v, n):
        return isinstance(v, (list, tuple)) and len(v) == n and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)

    if voxel_size is not None and not (numbers(voxel_size, 3) and min(voxel_size) > 0):
        problems.append(f"voxel_size must be 3 positive numbers (x, y, z in m), got {voxel_size!r}")
    if point_range is not None and not (numbers(point_range, 6) and all(
            point_range[i] < point_range[i + 3] for i in range(3))):
        problems.append(f"point_range must be [xmin, ymin, zmin, xmax, ymax, zmax] with min < max, got {point_range!r}")
    if image_crop_hw is not None and not (isinstance(image_crop_hw, (list, tuple)) and len(image_crop_hw) == 2
                                          and all(isinstance(x, int) and x >= 1 for x in image_crop_hw)):
        problems.append(f"image_crop_hw must be null or two whole numbers >= 1 (height, width), got {image_crop_hw!r}")
    if max_frames is not None and (isinstance(max_frames, bool) or not isinstance(max_frames, int) or max_frames < 1):
        problems.append(f"max_frames must be null (all) or a whole number >= 1, got {max_frames!r}")
    if isinstance(frame_stride, bool) or not isinstance(frame_stride, int) or frame_stride < 1:
        problems.append(f"frame_stride must be a whole number >= 1, got {frame_stride!r}")
    if out_of_range not in ("clip", "drop"):
        problems.append(f"out_of_range must be 'clip' or 'drop', got {out_of_range!r}")
    if isinstance(image_scale, bool) or not isinstance(image_scale, (int, float)) or not 0 < image_scale <= 4:
        problems.append(f"image_scale must be a number in (0, 4], got {image_scale!r}")
    if problems:
        raise ValueError("; ".join(problems))


def check_frame_files(root: Path, sequences: Sequence[str], frames: Sequence[Frame], labels: bool,
                      images: bool) -> None:
    """Raise :class:`KittiDataError` naming the missing file when a sequence's scans, labels and
    images disagree: frames are listed from the ``.bin`` scans, so a scan missing beside its
    ``.label`` / ``.png`` would otherwise drop the frame without a word. A sequence without
    a labels/ (test) or image_2/ folder at all is not checked for that kind."""
    from .frames import normalise_sequence

    scans = {(f.sequence, f.frame) for f in frames}
    for seq in sequences:
        seq = normalise_sequence(seq)
        seq_dir = Path(root) / "sequences" / seq
        for wanted, sub, ext in ((labels, "labels", ".label"), (images, "image_2", ".png")):
            folder = seq_dir / sub
            if not wanted or not folder.is_dir():
                continue
            orphans = sorted(p.stem for p in folder.glob(f"*{ext}") if (seq, p.stem) not in scans)
            if orphans:
                missing = seq_dir / "velodyne" / f"{orphans[0]}.bin"
                raise KittiDataError(missing, f"scan not found, but {sub}/{orphans[0]}{ext} exists "
                                              f"({len(orphans)} such frame(s) in sequence {seq}): an incomplete "
                                              "download or copy")


def input_settings(data_cfg: Dict[str, Any], keys: Sequence[str]) -> Dict[str, Any]:
    """The dataset options ``keys`` of a dataset config as the dataset will use them: unset
    (or null) ones at the dataset's defaults, lists as lists of floats. Compared to tell whether
    two configs give a model the same input (a checkpoint's scoring, a teacher cache)."""
    import inspect

    params = inspect.signature(SemanticKITTIDataset).parameters
    defaults = {k: params[k].default for k in keys}
    defaults.update({k: v for k, v in (("voxel_size", DEFAULT_VOXEL_SIZE), ("point_range", DEFAULT_POINT_RANGE),
                                       ("image_mean", IMAGENET_MEAN), ("image_std", IMAGENET_STD)) if k in keys})
    out = {}
    for k in keys:
        v = data_cfg.get(k)
        v = defaults[k] if v is None else v
        out[k] = [float(x) for x in v] if isinstance(v, (list, tuple)) else v
    return out


@DATASETS.register_module("semantickitti")
class SemanticKITTIDataset(Dataset):
    """SemanticKITTI (or a synthetic dataset in its layout).

    Args:
        root: folder holding ``sequences/``.
        split: ``train`` | ``val`` | ``test`` | ``trainval``; picks sequences from
            ``split_sequences`` (defaults: train 00-07, 09-10; val 08; test 11-21).
        sequences: explicit sequence list, overriding ``split``'s.
        load_labels: default: every split but ``test`` (which has no labels).
        load_image: read image_2 and calib.txt and compute the pixel correspondences.
        augment: default: ``split == "train"``.
        fov_only: keep only the points in the camera's field of view (the whole image, before
            any crop), for models, labels and scores alike: the authors' ``fov`` protocol
            (their PMF-based student sees the in-view points only). Needs ``load_image``.
        image_scale: resize the image by this factor first (train and eval; pixels follow).
        image_crop_hw: fixed (H, W) training crop after the resize; ``null`` keeps the whole
            image; ``image_crop_mode`` ``bottom``/``random``.
        color_jitter: (brightness, contrast, saturation) strengths.
        voxel_size, point_range: the voxel grid (x, y, z) and [xmin, ymin, zmin, xmax, ymax, zmax].
        out_of_range: ``clip`` keeps every point in a border voxel; ``drop`` drops it.
        unknown_labels: ``error`` | ``ignore`` for raw ids absent from the label map.
        skip_bad_frames: warn, count (``bad_frames``) and return the next good frame
            instead of raising :class:`KittiDataError`.
        require_in_view: with ``load_image``, a scan with no point in the image is bad.
    """

    def __init__(self, root: str, split: str = "train", sequences: Optional[List[Union[str, int]]] = None,
                 split_sequences: Optional[Dict[str, Any]] = None, label_map_file: Optional[str] = None,
                 ignore_index: int = DEFAULT_IGNORE_INDEX, unknown_labels: str = "error",
                 load_labels: Optional[bool] = None, load_image: bool = True, camera: str = "P2",
                 require_in_view: bool = True, augment: Optional[bool] = None, fov_only: bool = False,
                 image_scale: float = 1.0, image_crop_hw: Optional[List[int]] = (320, 480),
                 image_crop_mode: str = "bottom",
                 image_flip_prob: float = 0.5, color_jitter: Optional[List[float]] = None,
                 image_mean: Optional[List[float]] = None, image_std: Optional[List[float]] = None,
                 rotate_z: float = float(np.pi), flip_x_prob: float = 0.5, flip_y_prob: float = 0.5,
                 scale_range: Optional[List[float]] = None, jitter_std: float = 0.0,
                 jitter_clip: float = 0.05, voxel_size: Optional[List[float]] = None,
                 point_range: Optional[List[float]] = None, out_of_range: str = "clip",
                 skip_bad_frames: bool = False, max_frames: Optional[int] = None,
                 frame_stride: int = 1, seed: int = 0):
        check_dataset_options(voxel_size=voxel_size, point_range=point_range, image_crop_hw=image_crop_hw,
                              image_scale=image_scale, max_frames=max_frames, frame_stride=frame_stride,
                              out_of_range=out_of_range)
        self.root = Path(root)
        if not (self.root / "sequences").is_dir():
            raise KittiDataError(self.root / "sequences", "dataset root has no sequences/ folder")
        self.split = split
        self.sequences = [str(s) for s in sequences] if sequences else sequences_of_split(split, split_sequences)
        all_frames = list_frames(self.root, self.sequences)
        self.load_labels = (split != "test") if load_labels is None else load_labels
        self.load_image = load_image
        check_frame_files(self.root, self.sequences, all_frames, self.load_labels, load_image)
        frames = all_frames[::frame_stride]
        self.frames: List[Frame] = frames[:max_frames] if max_frames else frames
        self.label_map = LabelMap(label_map_file, ignore_index)
        self.ignore_index = self.label_map.ignore_index
        self.num_classes = self.label_map.num_classes
        self.class_names = self.label_map.class_names
        if unknown_labels not in ("error", "ignore"):
            raise ValueError(f"unknown_labels must be 'error' or 'ignore', got {unknown_labels!r}")
        self.unknown_labels = unknown_labels
        self.camera = camera
        self.require_in_view = require_in_view
        if fov_only and not load_image:
            raise ValueError("fov_only needs load_image: the field of view is where points project into the image")
        self.fov_only = bool(fov_only)
        train = (split == "train") if augment is None else augment
        self.augment = train
        jitter = list(color_jitter) if color_jitter is not None else [0.4, 0.4, 0.4]
        self.image_aug = ImageAugmentor(
            crop_hw=image_crop_hw, crop_mode=image_crop_mode, scale=image_scale,
            flip_prob=image_flip_prob, brightness=jitter[0], contrast=jitter[1], saturation=jitter[2],
            mean=image_mean or IMAGENET_MEAN, std=image_std or IMAGENET_STD, train=train)
        self.point_aug = PointAugmentor(rotate_z=rotate_z, flip_x_prob=flip_x_prob, flip_y_prob=flip_y_prob,
                                        scale_range=scale_range or [0.95, 1.05], jitter_std=jitter_std,
                                        jitter_clip=jitter_clip) if train else None
        self.voxel_size = list(voxel_size or DEFAULT_VOXEL_SIZE)
        self.point_range = list(point_range or DEFAULT_POINT_RANGE)
        self.out_of_range = out_of_range
        self.skip_bad_frames = skip_bad_frames
        self.bad_frames = BadFrameLog()
        self.seed = seed
        self.epoch = 0
        self._calib_cache: Dict[Path, np.ndarray] = {}
        self.read_pixels = True  # see without_pixels

    def __len__(self) -> int:
        return len(self.frames)

    def without_pixels(self) -> "SemanticKITTIDataset":
        """This dataset for a consumer that reads no image pixels (a LiDAR student with no
        teacher in its step): the same samples, points, augmentation draws and pixel
        correspondences, but no ``image`` (its size comes from the PNG header; decoding it
        was a tenth of a lab student's time)."""
        ds = copy.copy(self)
        ds.read_pixels = False
        return ds

    def set_epoch(self, epoch: int) -> None:
        """Augmentations are drawn from (seed, epoch, index): call once per epoch."""
        self.epoch = int(epoch)

    # -- loading ---------------------------------------------------------------------------
    def __getitem__(self, index: int) -> Dict[str, Any]:
        for attempt in range(len(self.frames)):
            i = (index + attempt) % len(self.frames)
            try:
                sample = self.load(i)
                if attempt and not self.augment:
                    # evaluation: the substitute is scored once already as itself; its labels
                    # here are ignored, so a skipped frame is skipped, not counted twice
                    sample["labels"] = torch.full_like(sample["labels"], self.ignore_index)
                    sample["has_labels"] = False
                if attempt:
                    sample["skipped_frame"] = self.frames[index].frame_id  # reported in the scores
                return sample
            except KittiDataError as err:
                if not self.skip_bad_frames:
                    raise
                self.bad_frames.add(self.frames[i].frame_id, err)
                warnings.warn(f"skipping bad frame {self.frames[i].frame_id} "
                              f"({self.bad_frames.count} skipped so far): {err}", stacklevel=2)
        raise RuntimeError(f"every frame of {self.root} ({len(self.frames)}) is bad: {self.bad_frames}")

    def lidar_to_image(self, frame: Frame) -> np.ndarray:
        if frame.calib not in self._calib_cache:
            calib = read_calib(frame.calib)
            if self.camera not in calib:
                raise KittiDataError(frame.calib, f"no {self.camera} matrix")
            self._calib_cache[frame.calib] = lidar_to_image_matrix(calib, self.camera)
        return self._calib_cache[frame.calib]

    def load(self, index: int) -> Dict[str, Any]:
        """Load, project, augment and voxelize frame ``index`` (raises KittiDataError)."""
        frame = self.frames[index]
        rng = np.random.default_rng((self.seed, self.epoch, index))
        scan = read_scan(frame.scan)
        n = len(scan)
        if self.load_labels:
            sem, _ = read_label(frame.label, n)
            labels = self.label_map.to_train(sem, frame.label, self.unknown_labels)
        else:
            labels = np.full(n, self.ignore_index, dtype=np.int64)
        sample: Dict[str, Any] = {"frame_id": frame.frame_id, "has_labels": self.load_labels}
        point_index = np.arange(n, dtype=np.int64)  # row -> index in the .bin (and .label) file

        if self.load_image:
            proj_matrix = self.lidar_to_image(frame)
            image = read_image(frame.image) if self.read_pixels else None
            hw = image.shape[:2] if image is not None else read_image_size(frame.image)
            from .projection import check_image_size, check_maps_into_image
            check_image_size(frame.image, hw, proj_matrix, frame.calib, self.camera)
            check_maps_into_image(proj_matrix, hw, frame.calib, self.camera)
            proj = project_to_image(scan[:, :3], proj_matrix, hw)
            in_view = np.flatnonzero(proj.in_view)
            if in_view.size == 0 and self.require_in_view:
                raise KittiDataError(frame.scan, f"no point in the camera's view ({frame.image.name}, "
                                                 f"{image.shape[1]}x{image.shape[0]}, calib {frame.calib})")
            pixel_vu = proj.pixel_indices()
            if self.fov_only:  # the scan becomes its in-view points, in file order
                scan, labels, point_index = scan[in_view], labels[in_view], in_view
                in_view = np.arange(len(in_view))
            if image is not None:
                aug = self.image_aug(image, pixel_vu, rng)
                sample["image"] = torch.from_numpy(aug.image)
            else:  # the same correspondences and random draws, no pixels
                aug = self.image_aug.correspondences(hw, pixel_vu, rng)
            sample["image_hw"] = (min(hw[0], aug.hw[0]), min(hw[1], aug.hw[1]))
            sample["img_point_idx"] = torch.from_numpy(in_view[aug.keep])
            sample["img_pixel_vu"] = torch.from_numpy(aug.pixel_vu)

        xyz = scan[:, :3]
        if self.point_aug is not None:
            xyz, _ = self.point_aug(xyz, rng)
        points = np.concatenate([xyz, scan[:, 3:4]], axis=1).astype(np.float32, copy=False)
        points_t = torch.from_numpy(points)
        vox = voxelize(points_t, self.voxel_size, self.point_range, out_of_range=self.out_of_range)
        sample.update(points=points_t, labels=torch.from_numpy(labels), point_index=torch.from_numpy(point_index),
                      num_scan_points=n, voxel_features=vox.features,
                      voxel_coords=vox.coords, voxel_num_points=vox.num_points,
                      point2voxel=vox.point2voxel, spatial_shape=vox.spatial_shape)
        return sample

    def _train_labels(self, frame: Frame, what: str) -> Optional[np.ndarray]:
        """The train ids of ``frame`` on the rows the models train on (the in-view points with
        ``fov_only``), ignored rows dropped; None for a bad frame under ``skip_bad_frames``."""
        try:
            scan = read_scan(frame.scan)
            sem, _ = read_label(frame.label, len(scan))
            labels = self.label_map.to_train(sem, frame.label, self.unknown_labels)
            if self.fov_only:
                proj = project_to_image(scan[:, :3], self.lidar_to_image(frame), read_image_size(frame.image))
                labels = labels[proj.in_view]
        except KittiDataError as err:
            if not self.skip_bad_frames:
                raise
            warnings.warn(f"{what}: skipping bad frame {frame.frame_id}: {err}", stacklevel=3)
            return None  # training never reads it either
        return labels[labels != self.ignore_index]

    def _unlabelled_error(self, setting: str) -> KittiDataError:
        rows = "in-view points" if self.fov_only else "points"
        return KittiDataError(self.root, f"no labelled point in the training data (sequences "
                                         f"{', '.join(self.sequences)}, {len(self.frames)} frames): every "
                                         f"label of their {rows} maps to ignore (unlabelled / 0 under "
                                         f"{self.label_map.path}); {setting} has nothing to learn from. Are "
                                         "the labels/ files the right ones?")

    def label_counts(self, progress: bool = False) -> np.ndarray:
        """``[num_classes]`` int64 labelled points per class over every frame, on the rows the
        models train on (the in-view points with ``fov_only``); no augmentation, no voxels.
        All zero is a :class:`KittiDataError` naming the data (``loss.class_weights: frequency``
        counts these)."""
        from tqdm import tqdm

        counts = np.zeros(self.num_classes, dtype=np.int64)
        for frame in tqdm(self.frames, desc="class counts", disable=not (progress and sys.stderr.isatty())):
            labels = self._train_labels(frame, "class counts")
            if labels is not None:
                counts += np.bincount(labels, minlength=self.num_classes)[: self.num_classes]
        if not counts.any():
            raise self._unlabelled_error("loss.class_weights: frequency (class frequencies counted on it)")
        return counts

    def check_has_labels(self, setting: str = "training") -> None:
        """Raise :class:`KittiDataError` naming the root, sequences and ``setting`` when no frame
        has a labelled point. Stops at the first labelled frame (one frame on real data), so it
        is cheap enough to run before every training stage."""
        if not self.load_labels:
            return
        for frame in self.frames:
            labels = self._train_labels(frame, "label check")
            if labels is not None and labels.size:
                return
        raise self._unlabelled_error(setting)
