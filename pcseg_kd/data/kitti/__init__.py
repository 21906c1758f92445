"""SemanticKITTI: reader, label map, projection, augmentation, voxelization, batching,
and a synthetic generator in the same on-disk layout (``synthetic``).

Importing this package registers the ``semantickitti`` dataset in ``DATASETS``.
"""
from .augment import ImageAugmentor, ImageAugResult, PointAugmentor
from .calib import lidar_to_image_matrix, read_calib, read_poses, velodyne_poses
from .collate import collate_kitti
from .dataset import SemanticKITTIDataset
from .errors import BadFrameLog, KittiDataError
from .frames import DEFAULT_SPLITS, Frame, list_frames, split_sequences
from .labels import DEFAULT_IGNORE_INDEX, DEFAULT_LABEL_MAP_FILE, NUM_CLASSES, LabelMap
from .projection import Projection, project_to_image
from .reader import read_image, read_label, read_scan
from .voxelize import Voxels, grid_shape, voxelize

__all__ = [
    "ImageAugmentor", "ImageAugResult", "PointAugmentor", "lidar_to_image_matrix", "read_calib",
    "read_poses", "velodyne_poses", "collate_kitti", "SemanticKITTIDataset", "BadFrameLog",
    "KittiDataError", "DEFAULT_SPLITS", "Frame", "list_frames", "split_sequences",
    "DEFAULT_IGNORE_INDEX", "DEFAULT_LABEL_MAP_FILE", "NUM_CLASSES", "LabelMap", "Projection",
    "project_to_image", "read_image", "read_label", "read_scan", "Voxels", "grid_shape", "voxelize",
]
