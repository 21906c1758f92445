"""pcseg_kd: cross-modal knowledge distillation for LiDAR semantic segmentation.

Folders follow the data flow: ``data`` -> ``models`` -> ``distill`` -> ``engine`` -> ``metrics``.
"""
__version__ = "0.1.0"
