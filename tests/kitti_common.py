"""What the SemanticKITTI engine tests share: the quickstart config shrunk to tiny data."""
from pathlib import Path

import pytest

from pcseg_kd.models.sparse.spconv_compat import HAVE_SPCONV

ROOT = Path(__file__).resolve().parents[1]
QUICK = str(ROOT / "configs/kitti/quickstart.yaml")
needs_spconv = pytest.mark.skipif(not HAVE_SPCONV, reason="spconv is not installed (pip install 'pcseg_kd[spconv]')")
POINT = "{base_channels: 8, channels: [8, 8, 8, 8, 8, 8, 8, 8], layers: [1, 1, 1, 1, 1, 1, 1, 1], stem_kernel: 3}"


def tiny_overrides(root, student_epochs: int = 2, steps: int = 2, **extra):
    """Dotted overrides: the quickstart on the tiny dataset at ``root`` (train 00, val 08), online teacher,
    0.2 m voxels, 8-wide students, 1 teacher epoch, ``steps`` steps per epoch, validation every
    epoch, teacher and student stages; ``extra`` keys override any of them."""
    # the online teacher (the quickstart's default is the cache): tests that want the cache say so
    o = ["distiller.teacher_source=online", f"data.train.root={root}", f"data.val.root={root}", "data.synthetic=null",
         "data.train.sequences=[00]", "data.val.sequences=[08]", "data.num_workers=0",
         "data.train.voxel_size=[0.2,0.2,0.2]", "data.val.voxel_size=[0.2,0.2,0.2]",
         f"student.model={POINT}", "teacher.optim.epochs=1", f"student.optim.epochs={student_epochs}",
         f"teacher.optim.max_steps_per_epoch={steps}", f"student.optim.max_steps_per_epoch={steps}",
         "log_interval=1", "stages=[teacher,student]", "eval_interval=1"]
    return o + [f"{k}={v}" for k, v in extra.items()]


def tiny_root(tmp_path_factory, name: str, frames: int, seed: int):
    """A tiny synthetic SemanticKITTI (sequences 00 and 08) under a fresh temporary folder."""
    from pcseg_kd.data.kitti.testing import tiny_synthetic
    return tiny_synthetic(tmp_path_factory.mktemp(name), sequences=("00", "08"), frames=frames, seed=seed)
