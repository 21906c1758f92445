"""The sparse backend switch (models/sparse/backend.py) and checkpoint compatibility between
spconv and spconv-Triton, with the real packages on a CPU: spconv-Triton's modules build on a
CPU (only its kernels need CUDA), so structure, state-dict layout and cross-loading are checked
here; numerical parity needs a GPU (tools/gpu_parity.py, run by tools/gpu_check.sh)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pcseg_kd.models.sparse import backend as B
from pcseg_kd.models.sparse.spconv_compat import HAVE_SPCONV

needs_both = pytest.mark.skipif(not (HAVE_SPCONV and B.HAVE_SPCONV_TRITON),
                                reason="needs spconv and spconv-triton (pip install -e '.[test]')")
pytestmark = needs_both

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(base_channels=8, channels=(8, 16, 16, 16, 16, 16, 8, 8), layers=(1, 2, 1, 1, 1, 1, 2, 1), stem_kernel=3)
TINY_IMAGE = dict(widths=(8, 8, 8, 8), depths=(1, 1, 1, 1), decoder_channels=8)


def spunet(backend, seed=0):
    from pcseg_kd.models.sparse.spunet import SpUNet
    torch.manual_seed(seed)
    return SpUNet(**TINY, backend=backend)


def fusion(backend, seed=0):
    from pcseg_kd.models.fusion_teacher import FusionTeacher
    torch.manual_seed(seed)
    return FusionTeacher(num_classes=5, point={**TINY, "backend": backend}, image=TINY_IMAGE, fusion_channels=8)


def sparse_layers(model):
    """(name, class name, the hyper-parameters that define the operator) of every sparse conv,
    read from the module attributes both packages keep (spconv's API)."""
    out = []
    for name, m in model.named_modules():
        if hasattr(m, "indice_key") and hasattr(m, "kernel_size"):
            out.append((name, type(m).__name__, tuple(m.kernel_size), tuple(m.stride), tuple(m.padding),
                        tuple(m.dilation), m.subm, m.inverse, m.indice_key, m.in_channels, m.out_channels,
                        m.bias is not None))
    return out


def randomize(model, seed):
    """Weights and BatchNorm statistics unlike any initialisation, so a load that dropped or
    permuted a tensor cannot pass by coincidence."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, t in model.state_dict().items():
            if k.endswith("running_var"):
                t.uniform_(0.5, 1.5, generator=g)
            elif t.is_floating_point():  # the initial scale kept, so activations stay finite
                t.mul_(1 + 0.5 * torch.randn(t.shape, generator=g)).add_(0.05 * torch.rand(t.shape, generator=g))
            else:
                t.fill_(int(torch.randint(1, 100, (), generator=g)))
    return model


# ---- the switch -----------------------------------------------------------------------------

def test_resolve_names_and_packages():
    assert B.resolve_backend("spconv") == "spconv"
    assert B.resolve_backend("spconv_triton") == "spconv_triton"
    assert B.sparse_backend("spconv").__name__ == "spconv.pytorch"
    assert B.sparse_backend("spconv_triton").__name__ == "spconv_triton.pytorch"
    with pytest.raises(ValueError, match=r"student\.model\.backend: unknown sparse backend 'spconv2'"):
        B.resolve_backend("spconv2", key="student.model.backend")


def test_auto_follows_the_device_and_spconvs_build(monkeypatch):
    assert B.resolve_backend("auto", "cpu") == "spconv"
    # a CUDA device with a CPU-only spconv (the GPU machines' situation): spconv-Triton
    monkeypatch.setattr(B, "spconv_has_cuda", lambda: False)
    assert B.resolve_backend("auto", "cuda") == "spconv_triton"
    assert B.resolve_backend("auto", torch.device("cuda", 0)) == "spconv_triton"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert B.resolve_backend("auto") == "spconv_triton"  # no device: CUDA when available
    monkeypatch.setattr(B, "spconv_has_cuda", lambda: True)  # spconv-cu1xx installed: keep spconv
    assert B.resolve_backend("auto", "cuda") == "spconv"
    monkeypatch.setattr(B, "HAVE_SPCONV_TRITON", False)
    monkeypatch.setattr(B, "spconv_has_cuda", lambda: False)
    assert B.resolve_backend("auto", "cuda") == "spconv"
    with pytest.raises(ImportError, match=r"teacher\.model\.point\.backend: spconv_triton: .*pip install"):
        B.resolve_backend("spconv_triton", key="teacher.model.point.backend")


def test_broken_install_names_the_key(monkeypatch):
    def broken(_):
        raise ImportError("triton 2.0 does not fit torch 2.13")
    monkeypatch.setattr(B, "_package", broken)
    with pytest.raises(ImportError, match=r"student\.model\.backend: spconv_triton is installed but cannot be "
                                          r"imported: triton 2\.0"):
        B.sparse_backend("spconv_triton", key="student.model.backend")


def test_missing_spconv_names_the_key_and_the_alternative(monkeypatch):
    monkeypatch.setattr(B, "HAVE_SPCONV", False)
    import pcseg_kd.models.sparse.spconv_compat as compat
    monkeypatch.setattr(compat, "HAVE_SPCONV", False)
    with pytest.raises(ImportError, match=r"student\.model\.backend: spconv.*backend: spconv_triton"):
        B.resolve_backend("spconv", key="student.model.backend")


def test_models_use_the_chosen_package_and_guards_only_for_spconv():
    from pcseg_kd.models.sparse import spconv_compat
    import spconv.pytorch as sp
    import spconv_triton.pytorch as st

    spconv_compat.uninstall_cpu_guards()
    try:
        m = spunet("spconv_triton")
        assert m.backend == "spconv_triton" and not spconv_compat.cpu_guards_installed()
        convs = [mod for mod in m.modules() if hasattr(mod, "indice_key")]
        assert convs and all(type(c).__module__.startswith("spconv_triton.") for c in convs)
        assert isinstance(m.stem, st.SparseSequential) and not isinstance(m.stem, sp.SparseSequential)
        m = spunet("spconv")
        assert spconv_compat.cpu_guards_installed()
        assert all(type(c).__module__.startswith("spconv.") for c in m.modules() if hasattr(c, "indice_key"))
        assert spunet("auto").backend == ("spconv_triton" if torch.cuda.is_available() and not B.spconv_has_cuda()
                                          else "spconv")
    finally:
        spconv_compat.install_cpu_guards()


def test_spconv_triton_forward_on_cpu_names_the_key():
    from test_spunet import batch_of, scene
    m = spunet("spconv_triton").eval()
    with pytest.raises(RuntimeError, match=r"'spconv_triton' runs on CUDA only.*student\.model\.backend"):
        m(batch_of(scene(n=500)[0]))


def test_cuda_input_under_a_cpu_only_spconv_names_the_key(monkeypatch):
    from types import SimpleNamespace
    on_cuda = SimpleNamespace(is_cuda=True, device="cuda:0")  # only .is_cuda and .device are read
    monkeypatch.setattr(B, "spconv_has_cuda", lambda: False)
    with pytest.raises(RuntimeError, match=r"CPU-only build.*backend: spconv_triton or auto \(student\.model"):
        B.check_input_device("spconv", on_cuda)
    B.check_input_device("spconv_triton", on_cuda)
    monkeypatch.setattr(B, "spconv_has_cuda", lambda: True)
    B.check_input_device("spconv", on_cuda)


# ---- checkpoint compatibility -------------------------------------------------------------------

@pytest.mark.parametrize("build", [spunet, fusion], ids=["spunet", "fusion_teacher"])
def test_same_structure_and_state_dict_layout(build):
    a, b = build("spconv"), build("spconv_triton")
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)  # same names in the same order
    assert {k: (v.shape, v.dtype) for k, v in sa.items()} == {k: (v.shape, v.dtype) for k, v in sb.items()}
    la, lb = sparse_layers(a), sparse_layers(b)
    assert len(la) >= 10 and la == lb
    # spconv 2.x's weight layout [out, k, k, k, in], checked against the layer's own sizes
    for name, _, k, *_rest in la:
        w = sa[f"{name}.weight"]
        conv = a.get_submodule(name)
        assert tuple(w.shape) == (conv.out_channels, *k, conv.in_channels)


@pytest.mark.parametrize("build", [spunet, fusion], ids=["spunet", "fusion_teacher"])
@pytest.mark.parametrize("src,dst", [("spconv", "spconv_triton"), ("spconv_triton", "spconv")])
def test_weights_load_across_backends(build, src, dst, tmp_path):
    trained = randomize(build(src, seed=1), seed=7)
    path = tmp_path / "final.pt"
    torch.save({"model": trained.state_dict()}, path)  # through a file, as a checkpoint travels
    other = build(dst, seed=2)
    other.load_state_dict(torch.load(path)["model"])  # strict: every key, every shape
    got, want = other.state_dict(), trained.state_dict()
    assert list(got) == list(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_cross_loaded_spconv_model_computes_what_the_original_did():
    """spconv -> spconv-Triton -> spconv: the round trip through the other package's modules
    keeps every tensor where the forward reads it (checked by running it; spconv on CPU)."""
    from test_spunet import batch_of, scene
    batch = batch_of(scene(n=800)[0])
    original = randomize(spunet("spconv", seed=3), seed=11).eval()
    via = spunet("spconv_triton", seed=4)
    via.load_state_dict(original.state_dict())
    back = spunet("spconv", seed=5)
    back.load_state_dict(via.state_dict())
    with torch.no_grad():
        want, got = original.eval()(batch)["logits"], back.eval()(batch)["logits"]
    assert torch.isfinite(want).all() and want.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# ---- config keys --------------------------------------------------------------------------------

def _load(*overrides):
    from pcseg_kd.engine.kitti.schema import load_kitti_experiment
    return load_kitti_experiment(str(ROOT / "configs/kitti/quickstart.yaml"), list(overrides))


def test_config_accepts_and_checks_the_backend_keys():
    cfg = _load("student.model.backend=spconv_triton", "teacher.model.point.backend=auto")
    assert cfg["student"]["model"]["backend"] == "spconv_triton"
    assert cfg["teacher"]["model"]["point"]["backend"] == "auto"
    with pytest.raises(Exception, match=r"student\.model\.backend") as e:
        _load("student.model.backend=cuda")
    assert "spconv_triton" in str(e.value)
    with pytest.raises(Exception, match=r"point\.backend") as e:
        _load("teacher.model.point.backend=triton")
    assert "spconv_triton" in str(e.value)
