"""Score a trained checkpoint on a split and write SemanticKITTI prediction files.

Predictions follow the benchmark's layout, ``OUT/sequences/SS/predictions/NNNNNN.label``:
one uint32 per point of the original scan, in the scan's order, the raw label id (train
id mapped back through ``learning_map_inv``), instance bits 0, so that semantic-kitti-api's
``evaluate_semantics.py`` and the test-server submission read them as they are. Points the
model does not predict are written as raw 0, "unlabeled", which the official tool counts
as a miss of their class: points without a voxel (only with ``out_of_range: drop``; the
reported mIoU counts them the same way) and, with the ``fov`` protocol, the points outside
the camera's view (score those files on the in-view points to get the reported mIoU).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

from ...registry import DATASETS, MODELS
from ..checkpoint import load_checkpoint
from ..distributed import DistEnv
from .train import ShardedBatchSampler, evaluate, load_weights, make_loader, rows_of, to_device
from .tta import TTAModel, check_tta


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


# dataset settings a model's scores depend on: scoring under others silently changes the input
INPUT_KEYS = ("voxel_size", "point_range", "out_of_range", "fov_only", "image_scale", "camera")


def load_model(checkpoint: Path, device: torch.device, model_cfg: Optional[Dict[str, Any]] = None,
               stage: str = "student", data_cfg: Optional[Dict[str, Any]] = None):
    """A final.pt (which names its model) or a bare state_dict of ``model_cfg``'s model.

    A final.pt must hold the ``stage``'s kind of model (``model_cfg``'s type) and, when it
    stores its training config, have been trained on the input settings of ``data_cfg``
    (:data:`INPUT_KEYS`): anything else is an error naming the file and what differs."""
    from .train import without_pretrained

    state = load_checkpoint(checkpoint)
    weights = state.get("model", state)
    if not isinstance(weights, dict) or not all(torch.is_tensor(v) for v in weights.values()):
        raise ValueError(f"{checkpoint}: neither a pcseg_kd final.pt nor a state_dict")
    stored = state.get("model_cfg")
    if stored and model_cfg and stored.get("type") != model_cfg.get("type"):
        raise ValueError(f"{checkpoint} holds a {stored.get('type')!r} model, but --stage {stage} is a "
                         f"{model_cfg.get('type')!r} in this config: pass the matching --stage")
    trained = (state.get("config") or {}).get("data", {}).get("train")
    if trained and data_cfg:
        from ...data.kitti.dataset import input_settings
        was, now = input_settings(trained, INPUT_KEYS), input_settings(data_cfg, INPUT_KEYS)
        diff = [f"{k}: trained {was[k]}, now {now[k]}" for k in INPUT_KEYS if was[k] != now[k]]
        if diff:
            raise ValueError(f"{checkpoint} was trained with other input settings ({'; '.join(diff)}): score it "
                             "with the config it was trained with")
    model = MODELS.build(without_pretrained(stored or model_cfg))
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
    for batch in tqdm(loader, desc="predict", disable=not (progress and sys.stderr.isatty())):
        dev = to_device(batch, next(model.parameters()).device)
        out = model(dev)
        pred = out["logits"].argmax(-1)
        pred = torch.where(out["point_valid"], pred, torch.full_like(pred, -1)).cpu().numpy()
        offsets = batch["offsets"].tolist()
        point_index = batch["point_index"].numpy()
        for b, frame_id in enumerate(batch["frame_ids"]):
            seq, frame = frame_id.split("/")
            ids = pred[offsets[b]:offsets[b + 1]]
            raw = np.zeros(batch["num_scan_points"][b], dtype=np.uint32)  # every point of the file
            ok = ids >= 0
            raw[point_index[offsets[b]:offsets[b + 1]][ok]] = label_map.to_raw(ids[ok])
            path = out_dir / "sequences" / seq / "predictions" / f"{frame}.label"
            path.parent.mkdir(parents=True, exist_ok=True)
            raw.tofile(path)
            written += 1
    return written


def test_checkpoint(cfg: Dict[str, Any], checkpoint: Path, split: str = "val",
                    predictions: Optional[Path] = None, batch_size: int = 1, progress: bool = True,
                    device: Optional[torch.device] = None, stage: str = "student", tta: int = 1) -> Dict[str, Any]:
    """mIoU of ``checkpoint`` on ``split`` (unless it has no labels) and, with ``predictions``,
    the prediction files. ``stage``: whose model config a bare state_dict is. ``tta`` > 1 scores
    and predicts with the vote over that many views (:mod:`.tta`). Single process."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"--batch-size must be a whole number >= 1, got {batch_size}")
    tta = check_tta(tta)
    env = DistEnv(device=device or torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    ds_cfg = split_dataset_cfg(cfg, split)
    model = load_model(checkpoint, env.device, cfg["teacher" if stage == "teacher" else "student"]["model"],
                       stage, ds_cfg)
    if predictions is not None and rows_of(model) != "points":
        raise ValueError(f"{checkpoint}: {type(model).__name__} predicts in-view points only; prediction "
                         "files need a per-point model (the student)")
    if split == "test" and rows_of(model) == "points" and not ds_cfg.get("fov_only"):
        ds_cfg["load_image"] = False  # a LiDAR-only model on full scans needs no image_2 for 11-21
    ds = DATASETS.build(ds_cfg)
    if tta > 1:  # the views are voxelized on the grid the dataset voxelizes scans on
        model = TTAModel(model, tta, ds.voxel_size, ds.point_range, ds.out_of_range)
    sampler = ShardedBatchSampler(len(ds), batch_size, False, cfg["seed"], env, drop_last=False)
    result: Dict[str, Any] = {"checkpoint": str(checkpoint), "split": split, "scans": len(ds), "tta": tta}
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

