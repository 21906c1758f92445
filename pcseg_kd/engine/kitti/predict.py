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

import os
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set

import numpy as np
import torch

from ...registry import DATASETS, MODELS
from ..checkpoint import load_checkpoint
from ..distributed import DistEnv
from .data import ShardedBatchSampler, make_loader, to_device
from .evaluate import evaluate
from .objective import rows_of
from .teacher import load_weights, without_pretrained
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
def write_predictions(model, loader, label_map, out_dir: Path, progress: bool = True,
                      names: Optional[Set[Path]] = None) -> int:
    """One ``.label`` file per scan (:func:`write_label_file`); returns how many were written and
    adds their paths to ``names`` when given."""
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
            write_label_file(out_dir, path, raw)
            if names is not None:
                names.add(path)
            written += 1
    return written


def _no_symlink_below(root: Path, path: Path) -> None:
    """Refuse ``path`` when it or a folder between ``root`` and it is a symlink: a link planted
    in a submission folder would redirect the write to a file outside it."""
    part = root
    for name in path.relative_to(root).parts:
        part = part / name
        if part.is_symlink():
            raise PredictionWriteError(f"refusing to write {path}: {part} is a symlink (to {os.readlink(part)}); "
                                       "prediction files are written only as plain files inside the folder")


class PredictionWriteError(RuntimeError):
    """A prediction file could not be written; the message names the file and the cause."""


def write_label_file(root: Path, path: Path, raw: np.ndarray) -> None:
    """The one write path of prediction files: ``raw`` (uint32) to ``path`` under ``root``,
    atomically (temp file + rename in the same folder: a full disk or a kill leaves the old file
    or none, never a truncated one), never through a symlink."""
    from ...utils.io import atomic_write

    root, path = Path(root), Path(path)
    _no_symlink_below(root, path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _no_symlink_below(root, path)  # mkdir follows links: checked again once the folders exist
        atomic_write(path, lambda f: f.write(np.ascontiguousarray(raw, dtype=np.uint32).tobytes()), binary=True)
    except OSError as e:  # atomic_write's message names the file; a mkdir error names its folder
        raise PredictionWriteError(f"cannot write prediction file {path}: {e.strerror or e}") from e


def existing_label_files(out_dir: Path) -> List[Path]:
    """The ``.label`` files a previous run left under ``out_dir/sequences/*/predictions/``."""
    return sorted(Path(out_dir).glob("sequences/*/predictions/*.label"))


def check_predictions_dir(out_dir: Path, overwrite: bool) -> List[Path]:
    """Refuse a folder that already holds prediction files unless ``overwrite``; returns them."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise PredictionWriteError(f"--predictions {out_dir} is not a folder")
    old = existing_label_files(out_dir) if out_dir.is_dir() else []
    if old and not overwrite:
        raise PredictionWriteError(f"--predictions {out_dir} already holds {len(old)} .label files (e.g. {old[0]}): "
                                   "pass --overwrite to replace them (files of frames this run does not write "
                                   "are then removed), or choose an empty folder")
    return old


def remove_stale(old: Iterable[Path], written: Set[Path]) -> List[Path]:
    """Remove the earlier ``.label`` files that this run did not write (another frame list or
    subset): a submission folder then holds exactly this run's frames."""
    stale = [p for p in old if p not in written]
    for p in stale:
        try:
            p.unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            raise PredictionWriteError(f"cannot remove stale prediction file {p}: {e.strerror or e}") from e
    return stale


def test_checkpoint(cfg: Dict[str, Any], checkpoint: Path, split: str = "val",
                    predictions: Optional[Path] = None, batch_size: int = 1, progress: bool = True,
                    device: Optional[torch.device] = None, stage: str = "student", tta: int = 1,
                    sequences: Optional[Sequence[Any]] = None, overwrite: bool = False,
                    allow_fov_test: bool = False) -> Dict[str, Any]:
    """mIoU of ``checkpoint`` on ``split`` (unless it has no labels) and, with ``predictions``,
    the prediction files. ``stage``: whose model config a bare state_dict is. ``tta`` > 1 scores
    and predicts with the vote over that many views (:mod:`.tta`). ``sequences``: score only these
    (for ``test``: a dry run on a subset of 11-21). A ``predictions`` folder holding ``.label``
    files is refused unless ``overwrite``, which also removes the files of frames not written now.
    The test split under the ``fov`` protocol is refused unless ``allow_fov_test``. Single process."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"--batch-size must be a whole number >= 1, got {batch_size}")
    tta = check_tta(tta)
    if split == "test" and cfg.get("protocol") == "fov" and not allow_fov_test:
        raise ValueError(FOV_TEST_REFUSAL)
    ds_cfg = split_dataset_cfg(cfg, split)
    if sequences:
        ds_cfg["sequences"] = check_sequences(sequences, split)
    old = check_predictions_dir(predictions, overwrite) if predictions is not None else []
    env = DistEnv(device=device or torch.device("cuda" if torch.cuda.is_available() else "cpu"))
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
        names: Set[Path] = set()
        result["written"] = write_predictions(model, loader, ds.label_map, Path(predictions), progress, names)
        if result["written"] != len(ds.frames):
            raise RuntimeError(f"wrote {result['written']} prediction files for {len(ds.frames)} scans")
        result["removed_stale"] = len(remove_stale(old, names))
    if sequences:
        result["sequences"] = ds_cfg["sequences"]
    return result


#: the benchmark's test sequences
TEST_SEQUENCES = tuple(f"{i:02d}" for i in range(11, 22))

FOV_TEST_REFUSAL = (
    "--split test under protocol: fov: the student sees only the points in the camera's view, so the ~84 % "
    "of each scan outside it (103,402 of the 123,389 points of a real scan) would be written as raw 0 "
    "(unlabeled), each scored as a miss by the benchmark. Train and test a protocol: full model for a "
    "submission (configs/kitti/submission.yaml), or pass --allow-fov-test to write these files anyway")


def check_sequences(sequences: Sequence[Any], split: str) -> List[str]:
    """``--sequences 11 12`` as the dataset's two-digit names; for ``test`` within 11-21."""
    out = []
    for s in sequences:
        try:
            name = f"{int(str(s)):02d}"
        except ValueError:
            raise ValueError(f"--sequences: {s!r} is not a sequence number (e.g. 11)") from None
        if split == "test" and name not in TEST_SEQUENCES:
            raise ValueError(f"--sequences {s}: the test split is sequences 11-21")
        out.append(name)
    return sorted(set(out))

