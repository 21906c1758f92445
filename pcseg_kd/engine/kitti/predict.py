"""Score a trained checkpoint on a split and write SemanticKITTI prediction files.

Predictions follow the benchmark's layout, ``OUT/sequences/SS/predictions/NNNNNN.label``:
one uint32 per point of the original scan, in the scan's order, the raw label id (train
id mapped back through ``learning_map_inv``), instance bits 0, so that semantic-kitti-api's
``evaluate_semantics.py`` and the test-server submission read them as they are. Points
without a voxel (only with ``out_of_range: drop``) are written as raw 0, "unlabeled".
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

from ...registry import DATASETS, MODELS
from ..checkpoint import load_checkpoint
from ..distributed import DistEnv
from .train import ShardedBatchSampler, evaluate, load_weights, make_loader, rows_of, to_device


def split_dataset_cfg(cfg: Dict[str, Any], split: str) -> Dict[str, Any]:
    """The dataset config to score ``split`` with: ``val`` and ``train`` are the experiment's
    own (without augmentation); ``test`` is the validation config pointed at the test split's
    sequences, without labels."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    data = cfg["data"]
    if split != "train" and not data.get("val"):
        raise ValueError(f"--split {split}: the config has no data.val to score it with")
    base = dict(data["train"] if split == "train" else data["val"])
    base["augment"] = False
    if split == "test":
        # a submission needs every scan of 11-21 once: no subsets, no substituted frames
        for key in ("sequences", "max_frames", "frame_stride", "skip_bad_frames"):
            base.pop(key, None)
        base.update(split="test", load_labels=False)
    return base


def load_model(checkpoint: Path, device: torch.device, model_cfg: Optional[Dict[str, Any]] = None):
    """A final.pt (which names its model) or a bare state_dict of ``model_cfg``'s model."""
    state = load_checkpoint(checkpoint)
    weights = state.get("model", state)
    if not isinstance(weights, dict) or not all(torch.is_tensor(v) for v in weights.values()):
        raise ValueError(f"{checkpoint}: neither a pcseg_kd final.pt nor a state_dict")
    model = MODELS.build(state.get("model_cfg") or model_cfg)
    load_weights(model, weights, checkpoint)
    return model.to(device).eval()


@torch.no_grad()
def write_predictions(model, loader, label_map, out_dir: Path, progress: bool = True) -> int:
    """One ``.label`` file per scan; returns how many were written."""
    from tqdm import tqdm

    if rows_of(model) != "points":
        raise ValueError(f"{type(model).__name__} predicts in-view points only; prediction files need "
                         "a per-point model (the student)")
    model.eval()
    written = 0
    for batch in tqdm(loader, desc="predict", disable=not progress):
        dev = to_device(batch, next(model.parameters()).device)
        out = model(dev)
        pred = out["logits"].argmax(-1)
        pred = torch.where(out["point_valid"], pred, torch.full_like(pred, -1)).cpu().numpy()
        offsets = batch["offsets"].tolist()
        for b, frame_id in enumerate(batch["frame_ids"]):
            seq, frame = frame_id.split("/")
            ids = pred[offsets[b]:offsets[b + 1]]
            raw = np.zeros(len(ids), dtype=np.uint32)
            ok = ids >= 0
            raw[ok] = label_map.to_raw(ids[ok])
            path = out_dir / "sequences" / seq / "predictions" / f"{frame}.label"
            path.parent.mkdir(parents=True, exist_ok=True)
            raw.tofile(path)
            written += 1
    return written


def test_checkpoint(cfg: Dict[str, Any], checkpoint: Path, split: str = "val",
                    predictions: Optional[Path] = None, batch_size: int = 1, progress: bool = True,
                    device: Optional[torch.device] = None, stage: str = "student") -> Dict[str, Any]:
    """mIoU of ``checkpoint`` on ``split`` (unless it has no labels) and, with ``predictions``,
    the prediction files. ``stage``: whose model config a bare state_dict is. Single process."""
    env = DistEnv(device=device or torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_model(checkpoint, env.device, cfg[stage]["model"])
    if predictions is not None and rows_of(model) != "points":
        raise ValueError(f"{checkpoint}: {type(model).__name__} predicts in-view points only; prediction "
                         "files need a per-point model (the student)")
    ds_cfg = split_dataset_cfg(cfg, split)
    if split == "test" and rows_of(model) == "points":
        ds_cfg["load_image"] = False  # a LiDAR-only model needs no image_2 for 11-21
    ds = DATASETS.build(ds_cfg)
    sampler = ShardedBatchSampler(len(ds), batch_size, False, cfg["seed"], env, drop_last=False)
    result: Dict[str, Any] = {"checkpoint": str(checkpoint), "split": split, "scans": len(ds)}
    if ds.load_labels:
        result["metrics"] = evaluate(model, make_loader(ds, sampler, cfg["data"]["num_workers"], env.device),
                                     env, model.num_classes, ds.ignore_index, ds.class_names, progress)
    if predictions is not None:
        loader = make_loader(ds, sampler, cfg["data"]["num_workers"], env.device)
        result["predictions"] = str(predictions)
        result["written"] = write_predictions(model, loader, ds.label_map, Path(predictions), progress)
        if result["written"] != len(ds.frames):
            raise RuntimeError(f"wrote {result['written']} prediction files for {len(ds.frames)} scans")
    return result

