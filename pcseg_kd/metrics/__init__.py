"""Metrics: CMD (Zellinger et al., 2017), segmentation IoU (semantic-kitti-api conventions)."""
from .cmd import cmd  # noqa: F401
from .miou import SegmentationIoU, confusion_matrix, iou_from_confusion  # noqa: F401
