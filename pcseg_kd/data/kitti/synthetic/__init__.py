"""Synthetic SemanticKITTI: procedural street scenes, a simulated HDL-64E and a camera
rendered through the same calibration, written in the official on-disk layout."""
from .camera import ImageQuality
from .generate import SyntheticConfig, SyntheticSequence, generate_dataset
from .lidar import LidarModel
from .scene import SceneConfig

__all__ = ["ImageQuality", "SyntheticConfig", "SyntheticSequence", "generate_dataset", "LidarModel", "SceneConfig"]
