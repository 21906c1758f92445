"""Config schema of the SemanticKITTI experiments (``configs/kitti_*.yaml``, ``configs/kitti/``).

An experiment has up to three stages, run in order and each resumable on its own:
``teacher`` (trains the image or fusion teacher with the segmentation loss on its heads),
``baseline`` (the student's model and settings without KD: the no-KD row every claim is
measured against) and ``student`` (the segmentation loss on the student's rows plus the
distiller's KD term on the in-view points, against the frozen teacher). ``protocol``
says which points the student sees: ``fov`` (the authors': in-view points only) or
``full`` (2DPASS: the whole scan, KD on the in-view points). See docs/training_kitti.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from omegaconf import OmegaConf

from ...config import ConfigError, load_config_with_provenance, registry_field
from ...registry import DATASETS, DISTILLERS, MODELS
from ..runner import import_all, run_checks
from .export import ENGINE_KEYS, without_engine_keys

STAGES = ("teacher", "baseline", "student")
PROTOCOLS = ("fov", "full")
CLASS_WEIGHT_SOURCES = ("content", "frequency")


@dataclass
class KittiOptimConfig:
    optimizer: str = "adamw"       # "adamw" | "sgd"
    lr: float = 2e-3
    weight_decay: float = 5e-3
    momentum: float = 0.9          # sgd only
    schedule: str = "onecycle"     # "onecycle" | "cosine" | "constant"
    pct_start: float = 0.04        # onecycle warm-up fraction
    epochs: int = 50
    batch_size: int = 2            # scans per process and step
    grad_clip: float = 0.0         # max gradient norm; 0 = off
    amp: bool = False              # float16 autocast + GradScaler (CUDA only; ignored on CPU)
    max_steps_per_epoch: int = 0   # 0 = the whole epoch; > 0 caps it (smoke runs, benchmarks)

    def __post_init__(self):
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        if self.schedule not in ("onecycle", "cosine", "constant"):
            raise ValueError(f"schedule must be 'onecycle', 'cosine' or 'constant', got {self.schedule!r}")
        if not self.lr > 0 or self.epochs < 1 or self.batch_size < 1 or self.weight_decay < 0:
            raise ValueError(f"need lr > 0, epochs >= 1, batch_size >= 1, weight_decay >= 0; got lr={self.lr}, "
                             f"epochs={self.epochs}, batch_size={self.batch_size}, weight_decay={self.weight_decay}")
        if not 0 < self.pct_start < 1 or not 0 <= self.momentum < 1 or self.grad_clip < 0 \
                or self.max_steps_per_epoch < 0:
            raise ValueError(f"need 0 < pct_start < 1, 0 <= momentum < 1, grad_clip >= 0, max_steps_per_epoch >= 0; "
                             f"got {self.pct_start}, {self.momentum}, {self.grad_clip}, {self.max_steps_per_epoch}")


@dataclass
class SegLossConfig:
    """``ce · CE + lovasz · Lovász-softmax`` (2DPASS: CE with class weights + Lovász, both 1)."""
    ce: float = 1.0
    lovasz: float = 1.0
    # null: unweighted; "content": from the label map's content section (the official training
    # frequencies); "frequency": counted once on the training labels; or a list of 19 weights
    class_weights: Optional[Any] = None

    def __post_init__(self):
        if not (self.ce >= 0 and self.lovasz >= 0 and self.ce + self.lovasz > 0):
            raise ValueError(f"need ce >= 0, lovasz >= 0, not both 0; got ce={self.ce}, lovasz={self.lovasz}")
        cw = self.class_weights
        if cw is not None and cw not in CLASS_WEIGHT_SOURCES:
            if not isinstance(cw, (list, tuple)) or not all(isinstance(v, (int, float)) and v >= 0 for v in cw) \
                    or not any(cw):
                raise ValueError(f"class_weights must be null, {' or '.join(map(repr, CLASS_WEIGHT_SOURCES))}, "
                                 f"or a list of non-negative numbers; got {cw!r}")


@dataclass
class StageConfig:
    model: Dict[str, Any] = registry_field(MODELS)
    optim: KittiOptimConfig = field(default_factory=KittiOptimConfig)
    loss: SegLossConfig = field(default_factory=SegLossConfig)
    loss_weights: Dict[str, float] = field(default_factory=dict)  # teacher: head name -> loss weight
    # start from these weights (a final.pt / best.pt / last.pt, or a bare state_dict) instead of
    # the initialisation: fine-tuning; its path and a digest of its weights join the fingerprint
    load_from: Optional[str] = None
    # teacher only: train K fold teachers beside the teacher, fold k on every training scan outside
    # fold k (contiguous blocks of frames per sequence), and give each scan the cached logits of
    # the fold teacher that did not see it (out-of-fold targets; 0 = off). Needs the teacher cache.
    folds: int = 0
    # teacher only: what a fold is: "block" (contiguous frames of every sequence) or "sequence"
    # (whole sequences: a fold teacher never sees its fold's streets)
    fold_by: str = "block"
    # teacher only: dataset settings merged into data.train for the teacher stage alone (e.g.
    # other sequences: a held-out teacher)
    data: Optional[Dict[str, Any]] = None


@dataclass
class KittiDataConfig:
    train: Dict[str, Any] = registry_field(DATASETS)
    val: Optional[Dict[str, Any]] = registry_field(DATASETS, default=None)
    num_workers: int = 2
    # generate a synthetic dataset at the train/val root when that root has no sequences/
    # (the embedded default; never used for a real dataset path unless asked for here)
    synthetic: Optional[Dict[str, Any]] = None


@dataclass(kw_only=True)
class KittiExperimentConfig:
    experiment: str = "semantickitti"
    name: str = ""
    data: KittiDataConfig = field(default_factory=KittiDataConfig)
    teacher: StageConfig = field(default_factory=StageConfig)
    teacher_checkpoint: Optional[str] = None   # use these teacher weights instead of training the teacher
    student: StageConfig = field(default_factory=StageConfig)   # the baseline stage uses it too
    protocol: str = "full"          # "fov": the student sees in-view points only (authors); "full": 2DPASS
    # besides the distiller's own keys: teacher_source and teacher_cache (export.ENGINE_KEYS)
    distiller: Dict[str, Any] = registry_field(DISTILLERS, engine_keys=ENGINE_KEYS)
    stages: List[str] = field(default_factory=lambda: ["teacher", "student"])
    eval_interval: int = 1          # epochs between validations (the last epoch is always validated)
    log_interval: int = 20          # steps between logged losses (the only host syncs of a step)
    checkpoint_interval: int = 0    # steps between mid-epoch checkpoints; 0 = at the end of each epoch only
    tensorboard: bool = False       # also write the logged losses and validations as TensorBoard events (WORK/<stage>/tb)
    # also log to Weights & Biases: {project, entity, mode (online | offline | disabled), name, tags}
    wandb: Optional[Dict[str, Any]] = None
    seed: int = 0
    device: str = "auto"            # "auto" | "cuda" | "cpu"
    threads: int = 0                # torch intra-op threads; 0 = torch default
    sync_bn: bool = False           # torchrun: BatchNorm statistics over the global batch (docs/training_kitti.md)
    size: Optional[str] = None      # a preset of configs/kitti/_sizes_ (tiny: smoke test; full: paper widths): sizes.py


#: numpy's and torch's seeds are 32-bit: a larger one fails deep inside them, far from its key
SEED_LIMIT = 2 ** 32


def model_num_classes(section: Dict[str, Any]) -> int:
    """The class count a model section builds: its ``num_classes``, else the model's default."""
    if "num_classes" in section:
        return section["num_classes"]
    from ...config import accepted_params
    params, _, _ = accepted_params(MODELS.get(section["type"]))
    p = params.get("num_classes")
    return p.default if p is not None and p.default is not p.empty else None


def _num_classes_problem(cfg: Dict[str, Any], section: str, num_classes: int) -> Optional[str]:
    model = cfg[section].get("model") or {}
    if not model.get("type") or model["type"] not in MODELS:
        return None  # an unknown model type is reported by the model's own check
    n = model_num_classes(model)
    if n is None:
        return None
    if isinstance(n, bool) or not isinstance(n, int):
        return f"expected a whole number, got {type(n).__name__} {n!r}"
    if n != num_classes:
        label_map = (cfg.get("data", {}).get("train") or {}).get("label_map_file") or "the default label map"
        return (f"{n} classes, but the data has {num_classes} (label map: {label_map}); "
                f"set {section}.model.num_classes={num_classes}")
    return None


def num_classes_sections(cfg: Dict[str, Any]) -> List[str]:
    """The model sections a run builds: the student's, and the teacher's where a stage uses it."""
    uses_teacher = "teacher" in cfg["stages"] or "student" in cfg["stages"]
    return ["student"] + (["teacher"] if uses_teacher and cfg.get("teacher", {}).get("model") else [])


def check_num_classes(cfg: Dict[str, Any], num_classes: int) -> None:
    """Raise ConfigError naming the key and both numbers when the student's (or, where a stage
    uses it, the teacher's) ``model.num_classes`` differs from the dataset's class count
    ``num_classes`` (the label map's): otherwise the mismatch surfaces as a shape error inside
    the loss. Also run by :func:`load_kitti_experiment` against the configured label map."""
    for section in num_classes_sections(cfg):
        problem = _num_classes_problem(cfg, section, num_classes)
        if problem:
            raise ConfigError(f"{section}.model.num_classes: {problem}")


def check_teacher_fit(cfg: Dict[str, Any]) -> None:
    """``teacher.folds`` / ``teacher.data``: the teacher's own keys, valid together."""
    folds = cfg["teacher"].get("folds") or 0
    if cfg["student"].get("folds") or cfg["student"].get("data"):
        raise ValueError("folds and data are teacher settings: student.folds / student.data are not used")
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 0 or folds == 1:
        raise ValueError(f"must be 0 (off) or a whole number >= 2, got {folds!r}")
    from ...data.kitti.folds import FOLD_UNITS
    if cfg["teacher"].get("fold_by", "block") not in FOLD_UNITS:
        raise ValueError(f"teacher.fold_by must be one of {list(FOLD_UNITS)}, got {cfg['teacher']['fold_by']!r}")
    if not folds:
        return
    if cfg["teacher"].get("data"):
        raise ValueError("folds split the student's training scans; teacher.data trains the teacher on other "
                         "scans: use one or the other")
    kd = cfg["distiller"].get("type") not in (None, "none")
    if "student" in cfg["stages"] and kd and cfg["distiller"].get("teacher_source", "online") != "cache":
        raise ValueError("out-of-fold targets come from the teacher cache (each scan from the fold teacher that "
                         "did not see it): set distiller.teacher_source=cache")


def check_dataset_keys(train: Dict[str, Any], overrides: Dict[str, Any]) -> None:
    """Dataset settings merged into ``data.train``: keys the dataset takes."""
    from ...config import accepted_params
    params, _, _ = accepted_params(DATASETS.get(train["type"]))
    unknown = sorted(set(overrides) - set(params) - {"type"})
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} for dataset {train['type']!r} (accepted: {', '.join(params)})")
    if overrides.get("type", train["type"]) != train["type"]:
        raise ValueError("the teacher's data must be of data.train's type")


def load_kitti_experiment(path: str, overrides: Sequence[str] = ()) -> Dict[str, Any]:
    """Load and validate a SemanticKITTI experiment; build its models, distiller and optimiser
    settings once so that a bad value fails before any data is read or generated."""
    import_all()
    cfg, prov = load_config_with_provenance(path, overrides, schema=KittiExperimentConfig)
    out = OmegaConf.to_container(cfg, resolve=True)
    from .sizes import apply_size
    apply_size(out, prov, path)  # before the checks below, which then check the preset's values too
    for split in ("train", "val"):  # the experiment's seed drives augmentation too, unless a dataset sets its own
        if out["data"].get(split) is not None:
            out["data"][split].setdefault("seed", out["seed"])
            if out["protocol"] in PROTOCOLS:  # the protocol decides which points the datasets keep
                if out["data"][split].get("fov_only", out["protocol"] == "fov") != (out["protocol"] == "fov"):
                    raise ConfigError(f"{path}: data.{split}.fov_only contradicts protocol: {out['protocol']} "
                                      "(leave fov_only unset; the protocol sets it)")
                out["data"][split]["fov_only"] = out["protocol"] == "fov"
    def distiller():
        built = DISTILLERS.build(without_engine_keys(out["distiller"]))
        if out["distiller"].get("teacher_source") == "cache" and built.uses_features:
            raise ValueError(f"teacher_source: cache holds the teacher's logits only; {out['distiller']['type']!r} "
                             "distils features: use teacher_source: online")

    def model(section):
        # built on the meta device: the constructor's checks run, no weights are allocated
        def build():
            with torch.device("meta"):
                MODELS.build(section)
        return build

    checks = [("student.model", model(out["student"]["model"])),
              ("student.optim", lambda: KittiOptimConfig(**out["student"]["optim"])),
              ("student.loss", lambda: SegLossConfig(**out["student"]["loss"])),
              ("distiller", distiller)]
    if "teacher" in out["stages"] and not out.get("teacher_checkpoint"):
        checks += [("teacher.model", model(out["teacher"]["model"])),
                   ("teacher.optim", lambda: KittiOptimConfig(**out["teacher"]["optim"])),
                   ("teacher.loss", lambda: SegLossConfig(**out["teacher"]["loss"]))]

    def stages():
        bad = [s for s in out["stages"] if s not in STAGES]
        if bad or not out["stages"] or len(set(out["stages"])) != len(out["stages"]):
            raise ValueError(f"must be a non-empty list of distinct stages from {list(STAGES)}, got {out['stages']}")
        out["stages"] = [s for s in STAGES if s in out["stages"]]  # always in data-flow order

    def protocol():
        if out["protocol"] not in PROTOCOLS:
            raise ValueError(f"must be one of {list(PROTOCOLS)}, got {out['protocol']!r}")

    def at_least(key, low):
        def check():
            if out[key] < low:
                raise ValueError(f"must be >= {low}, got {out[key]}")
        return check

    def loss_weights():
        from .objective import TEACHER_HEADS
        weights = out["teacher"].get("loss_weights") or {}
        unknown = sorted(set(weights) - set(TEACHER_HEADS))
        if unknown:
            raise ValueError(f"unknown head(s) {unknown}; the teachers' heads are {list(TEACHER_HEADS)}")
        negative = {k: v for k, v in weights.items() if not v >= 0}
        if negative:
            raise ValueError(f"head weights must be >= 0, got {negative}")
    def dataset(split):
        def check():
            from ...data.kitti.dataset import check_dataset_options
            keys = ("voxel_size", "point_range", "image_crop_hw", "image_scale", "max_frames", "frame_stride",
                    "out_of_range")
            check_dataset_options(**{k: out["data"][split][k] for k in keys if k in out["data"][split]})
        return check

    def synthetic():
        spec = dict(out["data"].get("synthetic") or {})
        if not spec:
            return
        import dataclasses

        from ...data.kitti.synthetic.camera import ImageQuality
        from ...data.kitti.synthetic.generate import SyntheticConfig, synthetic_config
        from ...data.kitti.synthetic.lidar import LidarModel
        for cls, given in ((SyntheticConfig, set(spec) - {"sequences"}), (LidarModel, set(spec.get("lidar") or {})),
                           (ImageQuality, set(spec.get("quality") or {}))):
            known = {f.name for f in dataclasses.fields(cls)}
            if given - known:
                raise ValueError(f"unknown key(s) {sorted(given - known)}; known: {sorted(known)}")
        spec.pop("sequences", None)
        synthetic_config(spec)

    def at_least_zero(key, below=None):
        def check():
            if isinstance(out[key], bool) or not isinstance(out[key], int) or out[key] < 0 \
                    or (below is not None and out[key] >= below):
                bound = f" and < {below}" if below is not None else ""
                raise ValueError(f"must be a whole number >= 0{bound}, got {out[key]!r}")
        return check

    def num_workers():
        if out["data"]["num_workers"] < 0:
            raise ValueError(f"must be >= 0 (0: load in the main process), got {out['data']['num_workers']}")

    def dataset_seed(split):
        def check():
            value = out["data"][split].get("seed", 0)
            if value == out["seed"]:  # inherited from the experiment's seed: checked there
                return
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < SEED_LIMIT:
                raise ValueError(f"must be a whole number in [0, 2**32), got {value!r}")
        return check

    def classes(section):
        def check():
            from ...data.kitti.labels import LabelMap
            train = out["data"]["train"]
            n = LabelMap(train.get("label_map_file"), train.get("ignore_index", 255)).num_classes
            problem = _num_classes_problem(out, section, n)
            if problem:
                raise ValueError(problem)
        return check

    def device():
        if out["device"] not in ("auto", "cuda", "cpu") and not str(out["device"]).startswith("cuda:"):
            raise ValueError(f"must be auto, cpu, cuda or cuda:N, got {out['device']!r}")
        if str(out["device"]).startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"{out['device']!r} asked for, but torch sees no CUDA device "
                             f"(torch {torch.__version__}); use device=cpu or auto")

    checks += [(f"data.{split}", dataset(split)) for split in ("train", "val") if out["data"].get(split)]
    checks += [("data.synthetic", synthetic), ("device", device), ("threads", at_least_zero("threads")),
               ("seed", at_least_zero("seed", SEED_LIMIT)), ("data.num_workers", num_workers)]
    checks += [(f"data.{split}.seed", dataset_seed(split)) for split in ("train", "val") if out["data"].get(split)]
    if out["data"].get("train", {}).get("type") == "semantickitti":
        checks += [(f"{section}.model.num_classes", classes(section)) for section in num_classes_sections(out)]
    checks += [("stages", stages), ("protocol", protocol), ("eval_interval", at_least("eval_interval", 1)),
               ("log_interval", at_least("log_interval", 1)),
               ("checkpoint_interval", at_least("checkpoint_interval", 0)),
               ("teacher.loss_weights", loss_weights)]
    if out["tensorboard"]:
        from ..loggers import check_tensorboard
        checks.append(("tensorboard", check_tensorboard))
    if out.get("wandb"):
        from ..loggers import check_wandb_settings
        checks.append(("wandb", lambda: check_wandb_settings(out["wandb"])))
    checks.append(("teacher.folds", lambda: check_teacher_fit(out)))
    if out["teacher"].get("data"):
        checks.append(("teacher.data", lambda: check_dataset_keys(out["data"]["train"], out["teacher"]["data"])))
    for section in ("teacher", "student"):
        if out[section].get("load_from"):
            def exists(path=out[section]["load_from"]):
                if not Path(path).is_file():
                    raise ValueError(f"{path} does not exist")
            checks.append((f"{section}.load_from", exists))
    run_checks(checks, prov)
    return out
