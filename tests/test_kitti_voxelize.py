"""Voxelization against a brute-force, one-point-at-a-time reference."""
import math

import numpy as np
import pytest
import torch

from pcseg_kd.data.kitti import grid_shape, voxelize
from pcseg_kd.data.kitti.testing import FIXTURE_SEQ

SIZE = [0.5, 0.4, 0.25]
RANGE = [-10.0, -8.0, -2.0, 10.0, 8.0, 1.0]


def brute_force(points, batch, size, prange, clip):
    dims = [round((prange[3 + a] - prange[a]) / size[a]) for a in range(3)]
    groups = {}
    p2v_key = []
    for p, b in zip(points.tolist(), batch.tolist()):
        g = [math.floor((p[a] - prange[a]) / size[a]) for a in range(3)]
        if clip:  # the point goes to the border voxel, its coordinates clipped into the range
            g = [min(max(g[a], 0), dims[a] - 1) for a in range(3)]
            p = [min(max(p[a], prange[a]), prange[3 + a]) for a in range(3)] + list(p[3:])
        elif any(g[a] < 0 or g[a] >= dims[a] for a in range(3)):
            p2v_key.append(None)
            continue
        key = (b, g[2], g[1], g[0])
        groups.setdefault(key, []).append(p)
        p2v_key.append(key)
    keys = sorted(groups)
    feats = []
    for k in keys:
        mean = np.mean(np.array(groups[k], dtype=np.float64), axis=0)
        centre = [prange[a] + (k[3 - a] + 0.5) * size[a] for a in range(3)]
        feats.append(list(mean) + [mean[a] - centre[a] for a in range(3)])
    row = {k: i for i, k in enumerate(keys)}
    p2v = [-1 if k is None else row[k] for k in p2v_key]
    return np.array(keys), np.array(feats), np.array([len(groups[k]) for k in keys]), np.array(p2v)


def random_points(n, seed, batch_size=1):
    rng = np.random.default_rng(seed)
    xyz = rng.uniform([-12, -9, -2.5], [12, 9, 1.5], (n, 3))  # some outside the range
    xyz[: n // 4] = np.round(xyz[: n // 4] / 0.25) * 0.25     # some exactly on voxel faces
    pts = np.concatenate([xyz, rng.uniform(0, 1, (n, 1))], 1).astype(np.float32)
    return pts, rng.integers(0, batch_size, n)


@pytest.mark.parametrize("out_of_range", ["clip", "drop"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_matches_brute_force(out_of_range, batch_size):
    pts, b = random_points(3000, seed=batch_size, batch_size=batch_size)
    v = voxelize(torch.from_numpy(pts), SIZE, RANGE, batch_idx=torch.from_numpy(b) if batch_size > 1 else None,
                 out_of_range=out_of_range)
    keys, feats, counts, p2v = brute_force(pts.astype(np.float64), b if batch_size > 1 else np.zeros(len(pts), int),
                                           SIZE, RANGE, out_of_range == "clip")
    assert v.coords.dtype == torch.int32 and v.coords.shape[1] == 4
    np.testing.assert_array_equal(v.coords.numpy(), keys)
    np.testing.assert_allclose(v.features.numpy(), feats, atol=2e-5)
    np.testing.assert_array_equal(v.num_points.numpy(), counts)
    np.testing.assert_array_equal(v.point2voxel.numpy(), p2v)
    assert v.spatial_shape == [12, 40, 40] and v.batch_size == batch_size
    if out_of_range == "drop":
        assert (p2v == -1).sum() > 100


def test_grid_shape_and_bad_grid():
    assert grid_shape([0.05] * 3, [-51.2, -51.2, -4, 51.2, 51.2, 2.4]) == [128, 2048, 2048]
    with pytest.raises(ValueError, match="bad voxel grid"):
        grid_shape([0.1] * 3, [0, 0, 0, -1, 1, 1])


def test_accepts_numpy_and_empty():
    pts, _ = random_points(50, 0)
    assert voxelize(pts, SIZE, RANGE).coords.shape[0] > 0
    empty = voxelize(np.zeros((0, 4), np.float32), SIZE, RANGE)
    assert empty.coords.shape == (0, 4) and empty.point2voxel.shape == (0,)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_matches_cpu():
    pts, b = random_points(20000, 5, batch_size=2)
    cpu = voxelize(torch.from_numpy(pts), SIZE, RANGE, batch_idx=torch.from_numpy(b))
    gpu = voxelize(torch.from_numpy(pts).cuda(), SIZE, RANGE, batch_idx=torch.from_numpy(b).cuda())
    assert gpu.coords.is_cuda
    torch.testing.assert_close(gpu.coords.cpu(), cpu.coords)
    torch.testing.assert_close(gpu.point2voxel.cpu(), cpu.point2voxel)
    torch.testing.assert_close(gpu.features.cpu(), cpu.features, atol=1e-4, rtol=1e-4)


def test_spconv_sparse_tensor_takes_the_output():
    spconv = pytest.importorskip("spconv.pytorch", reason="spconv not installed")
    pts, b = random_points(500, 1, batch_size=2)
    v = voxelize(torch.from_numpy(pts), SIZE, RANGE, batch_idx=torch.from_numpy(b))
    t = spconv.SparseConvTensor(v.features, v.coords, v.spatial_shape, v.batch_size)
    dense = t.dense()  # (B, C, Z, Y, X): each voxel's features land at its [b, z, y, x]
    c = v.coords.long()
    torch.testing.assert_close(dense[c[:, 0], :, c[:, 1], c[:, 2], c[:, 3]], v.features)


def test_clip_bounds_the_features_of_far_points():
    """A stray point far outside the range (1e8 m, 1e30 m) lands in a border voxel whose
    features stay inside the range; before, the raw coordinates reached the network."""
    pts, _ = random_points(500, 3)
    far = np.array([[1e8, 0.5, 0.1, 0.3], [-1e30, 1e30, -1e30, 0.7], [3.0, -2e8, 5e7, 0.2]], np.float32)
    allp = np.concatenate([pts, far])
    v = voxelize(torch.from_numpy(allp), SIZE, RANGE, out_of_range="clip")
    f = v.features.numpy()
    assert np.isfinite(f).all()
    lo, hi = np.array(RANGE[:3]), np.array(RANGE[3:])
    assert (f[:, :3] >= lo - 1e-5).all() and (f[:, :3] <= hi + 1e-5).all()
    assert (np.abs(f[:, 4:7]) <= np.array(SIZE) / 2 + 1e-5).all()  # offsets from the voxel centre
    # each far point's voxel is the border voxel its clipped coordinates give (independent float64 reference)
    dims = np.array(v.spatial_shape[::-1])
    for i, p in enumerate(far, start=len(pts)):
        c = np.clip(p[:3].astype(np.float64), lo, hi)
        g = np.minimum(np.floor((c - lo) / np.array(SIZE)), dims - 1).astype(int)
        assert v.coords[v.point2voxel[i]].tolist() == [0, g[2], g[1], g[0]]
    # drop mode: no voxel for them, and no integer overflow turning 1e30 into a valid index
    d = voxelize(torch.from_numpy(allp), SIZE, RANGE, out_of_range="drop")
    assert (d.point2voxel[len(pts):] == -1).all()


def test_voxel_indices_are_the_exact_float64_floor_on_the_real_scan():
    scan = FIXTURE_SEQ / "velodyne" / "000000.bin"
    if not scan.is_file():
        pytest.skip(f"real fixture scan {scan} is absent")
    pts = np.fromfile(scan, dtype=np.float32).reshape(-1, 4)
    size, prange = [0.05, 0.05, 0.05], [-51.2, -51.2, -4.0, 51.2, 51.2, 2.4]
    lo, sz = np.array(prange[:3], np.float64), np.array(size, np.float64)
    exact = np.floor((pts[:, :3].astype(np.float64) - lo) / sz).astype(np.int64)
    dims = np.array(grid_shape(size, prange)[::-1])
    inside = ((exact >= 0) & (exact < dims)).all(1)
    assert inside.sum() > 100_000
    # float32 arithmetic would put some points one voxel off: the check is not vacuous
    f32 = np.floor((pts[:, :3] - lo.astype(np.float32)) / sz.astype(np.float32)).astype(np.int64)
    assert (f32[inside] != exact[inside]).any(axis=1).sum() > 0
    v = voxelize(torch.from_numpy(pts), size, prange, out_of_range="drop")
    p2v = v.point2voxel.numpy()
    np.testing.assert_array_equal(p2v >= 0, inside)
    got = v.coords.numpy()[p2v[inside]][:, [3, 2, 1]]
    np.testing.assert_array_equal(got, exact[inside])
