#!/usr/bin/env python
"""Parity of the SpUNet student under a device backend (spconv-Triton on CUDA) against spconv on
a CPU (float32, one thread), with the same weights and the same batch.

    python tools/gpu_parity.py --root data/synthetic_kitti_full --out parity.json
    python tools/gpu_parity.py --root R --device cpu --backend spconv --sizes test   # plumbing dry run

For each size (``test``: the quickstart's widths at 0.1 m voxels; ``full``: SpUNet's default
widths at 0.05 m) one training-mode forward and backward of a fixed loss (random weights on the
point and voxel logits) and one eval-mode forward, compared on:

* ``point_valid`` (which points have a voxel): exactly;
* the voxel map of every encoder and decoder stage: the set of active sites exactly, and the
  features matched site by site (the packages may order the sites differently);
* per-point and per-voxel logits (training and eval mode) and every parameter's gradient.

Tolerance, per compared tensor: the device's float32 result may be at most ``--factor`` (10)
times as far from a float64 CPU run as the CPU's own float32 run is (relative Frobenius
error), plus ``--floor`` (1e-6). Float32 results differ from one another by the order of their
sums alone, so an independent float32 computation is the yardstick; a wrong kernel (a lost
neighbour, a transposed weight) is off by O(1). Prints one line per size and check and writes
every figure to ``--out`` (JSON); exit status 1 when a check fails.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

# full: a 12.8 m x 12.8 m box ahead of the car (~18k voxels of a full-resolution synthetic scan, of
# ~96k in the whole scan), so that the float64 and float32 CPU references take under a minute, not five
SIZES = {
    "test": dict(model=dict(base_channels=16, channels=(16, 32, 32, 32, 32, 32, 16, 16), layers=(1,) * 8,
                            stem_kernel=3), voxel=0.1, point_range=None),
    "full": dict(model={}, voxel=0.05, point_range=[0.0, -6.4, -3.0, 12.8, 6.4, 2.0]),
}
TINY = dict(model=dict(base_channels=8, channels=(8,) * 8, layers=(1,) * 8, stem_kernel=3), voxel=0.4, point_range=None)


def batch_for(root: str, voxel: float, point_range, scans: int) -> Dict[str, Any]:
    from pcseg_kd.data.kitti.collate import collate_kitti
    from pcseg_kd.engine.runner import import_all
    from pcseg_kd.registry import DATASETS

    import_all()
    crop = {"point_range": point_range, "out_of_range": "drop"} if point_range else {}
    ds = DATASETS.build({"type": "semantickitti", "root": root, "split": "train", "sequences": ["00"],
                         "augment": False, "load_image": False, "voxel_size": [voxel] * 3, **crop})
    return collate_kitti([ds[i] for i in range(min(scans, len(ds)))])


def sorted_sites(indices, spatial_shape):
    """A stage's (batch, z, y, x) sites as one int64 key each, and the order that sorts them."""
    idx = indices.long()
    key = idx[:, 0]
    for d, size in enumerate(spatial_shape):
        key = key * int(size) + idx[:, d + 1]
    order = torch.argsort(key)
    return key[order], order


def run(model, batch: Dict[str, Any], device: torch.device, dtype: torch.dtype, weights) -> Dict[str, Any]:
    """Outputs, stage maps and gradients of one training step and one eval forward, on the CPU."""
    from pcseg_kd.engine.kitti.data import to_device

    model = model.to(device=device, dtype=dtype)
    b = to_device(batch, device)
    b["voxel_features"] = b["voxel_features"].to(dtype)
    maps: Dict[str, Any] = {}

    def hook(name):
        def fn(_module, _inputs, out):
            keys, order = sorted_sites(out.indices, out.spatial_shape)
            maps[name] = (keys.cpu(), out.features.detach()[order].double().cpu())
        return fn

    handles = [m.register_forward_hook(hook(f"down{i}")) for i, m in enumerate(model.down)]
    handles += [m.register_forward_hook(hook(f"up{i}")) for i, m in enumerate(model.up)]
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(b)
    w_point, w_voxel = weights(out["logits"].shape[1], len(out["logits"]), len(out["voxel_logits"]))
    loss = (out["logits"] * w_point.to(device, dtype)).sum() + (out["voxel_logits"] * w_voxel.to(device, dtype)).sum()
    loss.backward()
    for h in handles:
        h.remove()
    res = {"point_valid": out["point_valid"].cpu(), "maps": maps,
           "logits_train": out["logits"].detach().double().cpu(),
           "voxel_logits_train": out["voxel_logits"].detach().double().cpu(),
           "grads": {n: p.grad.double().cpu() for n, p in model.named_parameters() if p.grad is not None}}
    model.eval()
    with torch.no_grad():
        e = model(b)
    res["logits_eval"] = e["logits"].double().cpu()
    res["voxel_logits_eval"] = e["voxel_logits"].double().cpu()
    return res


def rel(a, ref) -> float:
    return float((a - ref).norm() / ref.norm().clamp_min(1e-30))


def compare(dev, cpu32, cpu64, factor: float, floor: float) -> Dict[str, Any]:
    checks: Dict[str, Any] = {}

    def tensor(name, a, b32, b64):
        err, own = rel(a, b64), rel(b32, b64)
        tol = factor * own + floor
        checks[name] = {"rel_err": err, "cpu_fp32_rel_err": own, "tol": tol, "max_abs": float((a - b64).abs().max()),
                        "ok": err <= tol}

    checks["point_valid"] = {"ok": bool(torch.equal(dev["point_valid"], cpu64["point_valid"])),
                             "points": int(dev["point_valid"].numel())}
    for stage, (keys, feats) in cpu64["maps"].items():
        dkeys, dfeats = dev["maps"][stage]
        same = dkeys.shape == keys.shape and bool(torch.equal(dkeys, keys))
        checks[f"sites_{stage}"] = {"ok": same, "sites": int(keys.numel()), "device_sites": int(dkeys.numel())}
        if same:
            tensor(f"features_{stage}", dfeats, cpu32["maps"][stage][1], feats)
    for name in ("logits_train", "voxel_logits_train", "logits_eval", "voxel_logits_eval"):
        tensor(name, dev[name], cpu32[name], cpu64[name])
    worst, grads_ok = None, True
    for pname, g64 in cpu64["grads"].items():
        err, own = rel(dev["grads"][pname], g64), rel(cpu32["grads"][pname], g64)
        tol = factor * own + floor
        grads_ok &= err <= tol
        if worst is None or err / tol > worst[1] / worst[2]:
            worst = (pname, err, tol, own)
    checks["grads"] = {"ok": grads_ok, "params": len(cpu64["grads"]), "worst_param": worst[0],
                       "worst_rel_err": worst[1], "worst_tol": worst[2], "worst_cpu_fp32_rel_err": worst[3],
                       "max_rel_err": max(rel(dev["grads"][n], g) for n, g in cpu64["grads"].items())}
    return checks


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True, help="a (synthetic) SemanticKITTI root with sequence 00")
    ap.add_argument("--sizes", nargs="+", default=["test", "full"], choices=[*SIZES, "tiny"])
    ap.add_argument("--scans", type=int, default=1, help="scans in the batch")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backend", default="spconv_triton", help="the device side's backend")
    ap.add_argument("--factor", type=float, default=10.0)
    ap.add_argument("--floor", type=float, default=1e-6)
    ap.add_argument("--out", default=None, help="JSON with every figure")
    args = ap.parse_args(argv)

    from pcseg_kd.models.sparse.spunet import SpUNet
    from pcseg_kd.utils.io import write_json

    device = torch.device(args.device)
    torch.set_num_threads(1)  # the CPU reference: spconv's CPU kernels are only right on one thread
    report: Dict[str, Any] = {"device": str(device), "backend": args.backend, "torch": torch.__version__,
                              "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
                              "factor": args.factor, "floor": args.floor, "sizes_asked": args.sizes, "sizes": {}}
    ok = True
    for size in args.sizes:
        spec = TINY if size == "tiny" else SIZES[size]
        batch = batch_for(args.root, spec["voxel"], spec["point_range"], args.scans)
        torch.manual_seed(0)
        ref = SpUNet(**spec["model"], backend="spconv")
        state = {k: v.clone() for k, v in ref.state_dict().items()}
        dev_model = SpUNet(**spec["model"], backend=args.backend)
        dev_model.load_state_dict(state)

        def weights(c, p, v):
            g = torch.Generator().manual_seed(1)
            return torch.randn(p, c, generator=g), torch.randn(v, c, generator=g)

        t0 = time.perf_counter()
        cpu64 = run(ref, batch, torch.device("cpu"), torch.float64, weights)
        ref.load_state_dict(state)  # the training-mode forward moved the BatchNorm statistics
        cpu32 = run(ref, batch, torch.device("cpu"), torch.float32, weights)
        t_cpu = time.perf_counter() - t0
        t0 = time.perf_counter()
        dev = run(dev_model, batch, device, torch.float32, weights)
        t_dev = time.perf_counter() - t0  # first use: includes the kernels' compilation and autotuning
        checks = compare(dev, cpu32, cpu64, args.factor, args.floor)
        size_ok = all(c["ok"] for c in checks.values())
        ok &= size_ok
        report["sizes"][size] = {"voxels": int(batch["voxel_coords"].shape[0]), "points": int(len(batch["points"])),
                                 "scans": batch["batch_size"], "seconds_cpu_fp64_fp32": t_cpu,
                                 "seconds_device_first": t_dev, "ok": size_ok, "checks": checks}
        print(f"[{size}] {report['sizes'][size]['voxels']} voxels, {batch['batch_size']} scan(s): "
              f"{'OK' if size_ok else 'FAIL'} (CPU fp64+fp32 {t_cpu:.1f} s, {device} first run {t_dev:.1f} s)",
              flush=True)
        for name, c in checks.items():
            if "rel_err" in c:
                print(f"  {name:<24} rel {c['rel_err']:.2e} (CPU fp32 {c['cpu_fp32_rel_err']:.2e}, tol {c['tol']:.2e})"
                      f"{'' if c['ok'] else '  FAIL'}")
            elif name == "grads":
                print(f"  grads ({c['params']} params)    max rel {c['max_rel_err']:.2e}; worst vs tol: "
                      f"{c['worst_param']} {c['worst_rel_err']:.2e} (tol {c['worst_tol']:.2e})"
                      f"{'' if c['ok'] else '  FAIL'}")
            else:
                print(f"  {name:<24} {'same' if c['ok'] else 'DIFFERENT'} "
                      f"({', '.join(f'{k} {v}' for k, v in c.items() if k != 'ok')})")
        report["ok"] = ok
        if args.out:  # after each size: a run cut short by its timeout keeps what it measured
            write_json(Path(args.out), report)
    print(f"parity: {'OK' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
