"""Sparse-voxel (spconv) point-cloud networks: the SemanticKITTI student.

``spconv_compat`` holds the guards spconv 2.3.8 needs on a CPU-only machine (REFERENCE §4).
"""
