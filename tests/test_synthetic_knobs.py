"""The synthetic generator's scene knobs (data.synthetic.scene): at 1.0 both reproduce the
generator's original output byte for byte; density changes the objects and nothing else;
the ground remission contrast changes the reported remission of ground points and nothing else."""
import hashlib

import cv2
import numpy as np
import pytest

from pcseg_kd.data.kitti.synthetic import SceneConfig, SyntheticConfig, SyntheticSequence
from pcseg_kd.data.kitti.synthetic.generate import synthetic_config
from pcseg_kd.data.kitti.synthetic.scene import GROUND_CLASSES
from pcseg_kd.data.kitti.testing import tiny_synthetic

# sha256 of tiny_synthetic(sequences=("00", "08"), frames=2, seed=3) (file names, scan and label
# bytes, decoded image pixels), computed on the generator before the knobs existed (commit f8e80b1)
PINNED = "af8cf8f46e7334692790462f76b2aae90c24d5189d5926e5d48d62a2651bdd93"
OBJECTS = {10, 18, 252, 258, 30, 254, 31, 253, 11, 80, 81}  # vehicles, people, cyclists, bicycles, poles, signs


def digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            # pixels, not PNG bytes: another zlib may compress the same image differently
            h.update(np.ascontiguousarray(cv2.imread(str(p))).tobytes() if p.suffix == ".png" else p.read_bytes())
    return h.hexdigest()


def test_knobs_at_one_reproduce_the_original_generator_byte_for_byte(tmp_path):
    assert digest(tiny_synthetic(tmp_path / "default", sequences=("00", "08"), frames=2, seed=3)) == PINNED
    explicit = tiny_synthetic(tmp_path / "explicit", sequences=("00", "08"), frames=2, seed=3,
                              scene=SceneConfig(density=1.0, ground_remission_contrast=1.0))
    assert digest(explicit) == PINNED
    other = tiny_synthetic(tmp_path / "other", sequences=("00",), frames=1, seed=3, scene=SceneConfig(density=2.0))
    assert (other / "sequences/00/velodyne/000000.bin").read_bytes() != \
        (explicit / "sequences/00/velodyne/000000.bin").read_bytes()


def prim_bytes(p):
    return b"".join(np.asarray(v, np.float64).tobytes() for v in (p.centre, p.size, p.colour, p.remission, p.yaw,
                                                                  p.velocity)) + f"{p.kind}/{p.label}/{p.instance}".encode()


def scene_of(seq, seed, density, frames=40):
    return SyntheticSequence(seq, SyntheticConfig(frames=frames, seed=seed, scene=SceneConfig(density=density))).scene


@pytest.mark.parametrize("seq, seed", [("00", 0), ("08", 5)])
def test_density_changes_the_objects_and_nothing_else(seq, seed):
    ref = scene_of(seq, seed, 1.0)
    ref_rest = [prim_bytes(p) for p in ref.prims if p.label not in OBJECTS]
    ref_objects = [prim_bytes(p) for p in ref.prims if p.label in OBJECTS]
    assert len(ref_objects) > 20
    for density in (0.0, 0.5, 2.0, 4.0):
        sc = scene_of(seq, seed, density)
        # the street, buildings, vegetation, sun and ground colours: identical, in the same order
        assert [prim_bytes(p) for p in sc.prims if p.label not in OBJECTS] == ref_rest
        assert sc.layout == ref.layout
        assert sc.sun_dir.tobytes() == ref.sun_dir.tobytes() and sc.sun_strength == ref.sun_strength
        assert sc.ground_colour_var.tobytes() == ref.ground_colour_var.tobytes()
        objects = [prim_bytes(p) for p in sc.prims if p.label in OBJECTS]
        if density > 1:  # the original objects stay where they were; the new ones come after them
            assert [prim_bytes(p) for p in sc.prims[:len(ref.prims)]] == [prim_bytes(p) for p in ref.prims]
            assert len(objects) > len(ref_objects)
        else:  # a thinned subset of the original objects, in their order
            it = iter(ref_objects)
            assert all(any(o == r for r in it) for o in objects)
            assert len(objects) < len(ref_objects) if density > 0 else objects == []


def count(scene, labels):
    return len({(p.label, p.instance) if p.instance else id(p) for p in scene.prims if p.label in labels})


def test_density_scales_the_object_counts():
    """Pedestrians, poles, signs and bicycles (no saturation) over several sequences: the
    counts scale with the density within Poisson noise."""
    kinds = {30, 254, 80, 81, 11}
    n = {d: sum(count(scene_of(s, seed, d), kinds) for s in ("00", "01", "05") for seed in (0, 1)) for d in (1.0, 0.5, 3.0)}
    assert n[1.0] > 150
    for d in (0.5, 3.0):
        expected = d * n[1.0]
        assert abs(n[d] - expected) < 4 * np.sqrt(expected) + 0.05 * expected, (d, n)


def test_extra_objects_come_from_their_own_stream():
    a, b = scene_of("00", 0, 2.0), scene_of("00", 1, 2.0)
    assert [prim_bytes(p) for p in a.prims] == [prim_bytes(p) for p in scene_of("00", 0, 2.0).prims]  # deterministic
    assert [prim_bytes(p) for p in a.prims] != [prim_bytes(p) for p in b.prims]


def lidar(contrast, seq="00", seed=2):
    cfg = SyntheticConfig(frames=4, seed=seed, scene=SceneConfig(ground_remission_contrast=contrast))
    return SyntheticSequence(seq, cfg).frame_lidar_only(1)


def test_ground_remission_contrast_changes_only_the_remission_of_ground_points():
    (p1, s1, i1), (p0, s0, i0), (p2, s2, i2) = lidar(1.0), lidar(0.0), lidar(2.0)
    for p, s, i in ((p0, s0, i0), (p2, s2, i2)):
        assert p[:, :3].tobytes() == p1[:, :3].tobytes() and s.tobytes() == s1.tobytes() and i.tobytes() == i1.tobytes()
    ground = np.isin(s1, GROUND_CLASSES)
    assert ground.mean() > 0.3
    other = ~ground & (s1 != 1)  # spurious returns (raw id 1) keep the remission of the surface they left
    for p in (p0, p2):
        assert p[other, 3].tobytes() == p1[other, 3].tobytes()
        assert (p[ground, 3] != p1[ground, 3]).mean() > 0.9
    # the reported remission is linear in the contrast where no clipping acts
    free = ground & (np.minimum.reduce([p0[:, 3], p1[:, 3], p2[:, 3]]) > 0) & \
        (np.maximum.reduce([p0[:, 3], p1[:, 3], p2[:, 3]]) < 0.99)
    assert free.sum() > 0.95 * ground.sum()
    np.testing.assert_allclose(p2[free, 3] - p1[free, 3], p1[free, 3] - p0[free, 3], atol=1e-6)
    means = {c: {k: float(p[s1 == c, 3].mean()) for k, p in (("0", p0), ("1", p1), ("2", p2))}
             for c in GROUND_CLASSES if (s1 == c).sum() > 200}
    assert {40, 48, 72} <= set(means)
    spread = {k: max(m[k] for m in means.values()) - min(m[k] for m in means.values()) for k in "012"}
    # at 0 only the incidence angle (terrain lies farther out, at grazing angles) still separates them
    assert spread["1"] > 0.05 and spread["0"] < spread["1"] / 3 and spread["2"] > 1.8 * spread["1"]


def test_scene_knobs_from_a_config_mapping():
    cfg = synthetic_config({"frames": 2, "scene": {"density": 2, "ground_remission_contrast": 0}})
    assert cfg.scene == SceneConfig(2.0, 0.0)
    assert synthetic_config({"frames": 2}).scene == SceneConfig()
    with pytest.raises(ValueError, match=r"data.synthetic.scene: unknown key\(s\) \['densty'\]"):
        synthetic_config({"scene": {"densty": 2}})
    for bad in (-1, float("nan"), True, "2"):
        with pytest.raises(ValueError, match="data.synthetic.scene.density: must be a finite number >= 0"):
            synthetic_config({"scene": {"density": bad}})
    with pytest.raises(ValueError, match="ground_remission_contrast: must be a finite number >= 0"):
        SceneConfig(ground_remission_contrast=-0.5)


def test_knobs_tool_prints_both_tables(tmp_path):
    import subprocess
    import sys
    from pathlib import Path
    tool = Path(__file__).resolve().parents[1] / "tools/synthetic_knobs.py"
    r = subprocess.run([sys.executable, str(tool), "--density", "1", "2", "--contrast", "0", "1", "--sequences", "00",
                        "--frames", "2", "--every", "1"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("| density | car pts / objs / scans with |") and lines[2].startswith("| 1 | ")
    rows = [ln for ln in lines if ln.startswith("| 0 | ") or ln.startswith("| 1 | ")]
    assert len(rows) == 3 and "(majority class alone:" in r.stdout
