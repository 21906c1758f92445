"""Smaller reliability items: spconv missing / its fx warning, ``lr: 1e-3`` in YAML."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_spunet_without_spconv_says_what_is_missing_and_how_to_install_it():
    # importing spconv is made to fail, as on a machine without it
    r = _run("""
        import sys
        sys.modules["spconv"] = None  # `import spconv...` now raises ImportError
        sys.modules["spconv_triton"] = None  # nor the GPU backend: no sparse package at all
        from pcseg_kd.models.sparse.spconv_compat import HAVE_SPCONV
        assert not HAVE_SPCONV
        import pcseg_kd.models
        from pcseg_kd.registry import MODELS, MissingDependencyError
        try:
            MODELS.build({"type": "spunet", "in_channels": 7, "num_classes": 19})
        except MissingDependencyError as e:
            assert isinstance(e, ImportError) and isinstance(e, ValueError)
            print("BUILD:", e)
        from pcseg_kd.config import ConfigError
        from pcseg_kd.engine.kitti.schema import load_kitti_experiment
        try:
            load_kitti_experiment("configs/kitti/quickstart.yaml")
        except ConfigError as e:
            print("CONFIG:", e)
    """)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    build = [line for line in out.splitlines() if line.startswith("BUILD:")]
    assert build and "model type 'spunet'" in build[0] and "requires spconv" in build[0]
    assert "pip install spconv" in build[0] and "spconv-cu12" in build[0]
    assert "unknown model type" not in out
    config = out[out.index("CONFIG:"):]
    assert "student.model.type: model type 'spunet' requires spconv" in config and "pip install spconv" in config
    assert "teacher.model.type: model type 'fusion_teacher' requires spconv" in config


def test_importing_spconv_through_pcseg_kd_does_not_print_the_fx_tracing_warning():
    pytest.importorskip("spconv.pytorch", reason="spconv not installed")
    code = """
        import torch
        {imp}
        import spconv.pytorch as sp
        feats = torch.randn(10, 4)
        coords = torch.zeros(10, 4, dtype=torch.int32)
        coords[:, 3] = torch.arange(10)
        sp.SparseConvTensor(feats, coords, [4, 4, 16], 1)
        print("done")
    """
    bare = _run(code.format(imp="pass"))
    assert bare.returncode == 0 and "is_fx_tracing will return true" in bare.stderr  # torch does print it
    ours = _run(code.format(imp="import pcseg_kd.models"))
    assert ours.returncode == 0 and "done" in ours.stdout, ours.stderr
    assert "is_fx_tracing" not in ours.stderr, ours.stderr


def test_lr_1e_minus_3_in_yaml_is_a_float(tmp_path):
    import yaml

    from pcseg_kd.config import ConfigError, load_config, validate
    from pcseg_kd.engine.kitti.schema import KittiOptimConfig

    f = tmp_path / "c.yaml"
    f.write_text("lr: 1e-3\nwd: 5E+2\nname: 1e-3x\nq: '1e-3'\nn: 3\nx: 1.5\n")
    assert yaml.safe_load(f.read_text())["lr"] == "1e-3"  # what plain PyYAML makes of it
    cfg = load_config(f)
    assert cfg.lr == 1e-3 and isinstance(cfg.lr, float) and cfg.wd == 500.0
    assert cfg.name == "1e-3x" and cfg.q == "1e-3" and cfg.n == 3 and cfg.x == 1.5
    # a quoted number stays a string and is refused with the fix in the message
    with pytest.raises(ConfigError, match=r"lr: expected float, got str '1e-3' \(a quoted number is a string"):
        validate({"lr": "1e-3"}, KittiOptimConfig)
