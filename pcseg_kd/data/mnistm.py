"""MNIST-M (Ganin & Lempitsky, 2015): the blending rule and readers for its two formats.

Blending rule (Ganin's, as in the widely used ``create_mnistm.py``): binarise the digit
(pixel > threshold, threshold 0 for MNIST's uint8), replicate it to RGB at 255, take a
random 28×28 crop of a random colour photo, output ``|crop - digit|`` per channel, so
the stroke shows the photo's negative and the background the photo itself. Crop
offsets are drawn in ``[0, H - 28)`` / ``[0, W - 28)`` (numpy's exclusive upper bound, as
the original), so photos must be at least 29×29.

Formats:

* index-aligned pickle of arrays (what ``tools/make_mnistm.py`` and the authors' code
  write): ``{"train": uint8 [N,28,28,3], "train_label": [N], "val" or "test": ..., ...}``,
  any pickle protocol, Python 2 pickles included; float images in [0, 1] are scaled to
  0..255 (see :func:`as_uint8_images`);
  image i is built from MNIST image i. The DANN-era ``mnistm_data.pkl`` (keys
  ``train``/``valid``/``test``, no labels; TensorFlow's MNIST split put the first 5000
  training images in ``valid``) is reassembled as ``valid + train``.
* folders of PNGs with a labels file (the released MNIST-M): ``mnist_m_train/*.png`` and
  ``mnist_m_train_labels.txt`` with lines ``00000000.png 5``. These are *not* index-aligned
  with MNIST; pair them by class (see :func:`pair_by_class`).
"""
from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

MNISTM_SPLITS = ("train", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


# ----------------------------------------------------------------------------- blending
def binarise_digits(digits: np.ndarray, threshold: float = 0) -> np.ndarray:
    """uint8 ``[N, 28, 28]`` -> RGB float ``[N, 28, 28, 3]`` of 0 / 255 (pixel > threshold)."""
    on = (np.asarray(digits) > threshold).astype(np.float32) * 255.0
    return np.repeat(on[..., None], 3, axis=-1)


def draw_crops(num: int, photo_shapes: Sequence[Tuple[int, int]], rng: np.random.Generator,
               size: int = 28) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For ``num`` images: photo index, crop row and crop column (all int64 ``[num]``), drawn in
    that order from ``rng`` (photo ids first, then rows, then columns, each vectorised)."""
    if not photo_shapes:
        raise ValueError("MNIST-M blending needs at least one background photo")
    for i, (h, w) in enumerate(photo_shapes):
        if h <= size or w <= size:
            raise ValueError(f"background photo {i} is {h}x{w}; crops of {size}x{size} need at least "
                             f"{size + 1}x{size + 1}")
    hs = np.array([h for h, _ in photo_shapes], dtype=np.int64)
    ws = np.array([w for _, w in photo_shapes], dtype=np.int64)
    which = rng.integers(0, len(photo_shapes), size=num)
    rows = rng.integers(0, hs[which] - size)  # exclusive bound, as np.random.randint(0, w - dw)
    cols = rng.integers(0, ws[which] - size)
    return which, rows, cols


def blend_mnistm(digits: np.ndarray, photos: Sequence[np.ndarray], rng: np.random.Generator,
                 threshold: float = 0, progress: bool = False, desc: str = "MNIST-M") -> np.ndarray:
    """MNIST-M images uint8 ``[N, 28, 28, 3]`` from grey digits ``[N, 28, 28]`` and RGB uint8
    photos ``[H, W, 3]``: ``|crop - 255·1[digit > threshold]|``. All crops are drawn from
    ``rng`` up front (:func:`draw_crops`)."""
    digits = np.asarray(digits)
    if digits.ndim != 3 or digits.shape[1:] != (28, 28):
        raise ValueError(f"blend_mnistm expects digits of shape [N, 28, 28], got {digits.shape}")
    for i, p in enumerate(photos):
        if p.ndim != 3 or p.shape[2] != 3:
            raise ValueError(f"background photo {i} must be RGB [H, W, 3], got shape {p.shape}")
    which, rows, cols = draw_crops(len(digits), [p.shape[:2] for p in photos], rng)
    from tqdm.auto import tqdm

    out = np.empty((len(digits), 28, 28, 3), dtype=np.uint8)
    for i in tqdm(range(len(digits)), desc=desc, disable=not progress, leave=False, mininterval=1.0):
        ink = binarise_digits(digits[i:i + 1], threshold)[0]
        crop = photos[which[i]][rows[i]:rows[i] + 28, cols[i]:cols[i] + 28].astype(np.float32)
        out[i] = np.abs(crop - ink).astype(np.uint8)
    return out


def load_photos(folder: os.PathLike | str, min_size: int = 29) -> Tuple[List[np.ndarray], List[str]]:
    """All images under ``folder`` (recursively, sorted by relative path so the order, hence
    the output, does not depend on the file system), as RGB uint8; with their paths."""
    from PIL import Image

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: photo folder not found (e.g. BSDS500's BSR/BSDS500/data/images/train)")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    photos, names = [], []
    for p in files:
        try:
            with Image.open(p) as im:
                arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
        except OSError as e:
            raise ValueError(f"{p}: cannot read image ({e})") from None
        if arr.shape[0] < min_size or arr.shape[1] < min_size:
            continue
        photos.append(arr)
        names.append(str(p.relative_to(folder)))
    if not photos:
        raise FileNotFoundError(f"{folder}: no images of at least {min_size}x{min_size} pixels "
                                f"({', '.join(IMAGE_SUFFIXES)})")
    return photos, names


# ----------------------------------------------------------------------------- pickle format
class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts/lists of numpy arrays only: a pickle from elsewhere cannot run code.

    Reads every protocol: protocol <= 2 pickles written by Python 3 store bytes as
    ``_codecs.encode(text, "latin1")`` (allowed: it only turns text into bytes), and Python 2
    pickles store array data as 8-bit ``str``, which needs ``encoding="latin1"`` (numpy's
    recommendation; the default ASCII refuses any byte above 127)."""

    _ALLOWED = {("collections", "OrderedDict"), ("builtins", "dict"), ("builtins", "list"),
                ("builtins", "tuple"), ("builtins", "int"), ("builtins", "float"), ("builtins", "str"),
                ("builtins", "bytes"), ("_codecs", "encode")}

    def __init__(self, file):
        super().__init__(file, encoding="latin1")
    _NUMPY = {"_reconstruct", "ndarray", "dtype", "scalar", "_frombuffer", "frombuffer"}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED or (module.split(".")[0] == "numpy" and name in self._NUMPY):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} (only numpy arrays are allowed)")


def as_uint8_images(images: np.ndarray, where: str) -> np.ndarray:
    """uint8 images from a stored array: uint8 as is; other integers in 0..255 cast; floats in
    [0, 1] scaled by 255 and rounded (ToTensor's range), integral floats in [0, 255] cast;
    anything else (negative, above 255, fractional values above 1, NaN) is an error rather
    than a silent truncation to 0/1."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images
    if images.dtype == np.bool_ or not (np.issubdtype(images.dtype, np.integer) or np.issubdtype(images.dtype, np.floating)):
        raise ValueError(f"{where}: images of dtype {images.dtype} cannot be read as 8-bit pixels")
    if images.size == 0:
        return images.astype(np.uint8)
    lo, hi = images.min(), images.max()
    if np.issubdtype(images.dtype, np.floating):
        if not np.isfinite(images).all():
            raise ValueError(f"{where}: float images contain NaN or infinite values")
        if lo >= 0.0 and hi <= 1.0:
            return np.rint(images.astype(np.float64) * 255.0).astype(np.uint8)
        if lo >= 0.0 and hi <= 255.0 and np.array_equal(images, np.rint(images)):
            return images.astype(np.uint8)
        raise ValueError(f"{where}: float images must lie in [0, 1] (scaled by 255) or hold whole numbers in "
                         f"[0, 255]; found values in [{lo:g}, {hi:g}]")
    if lo < 0 or hi > 255:
        raise ValueError(f"{where}: integer images must lie in 0..255, found values in [{lo}, {hi}]")
    return images.astype(np.uint8)


def _label_key(data: dict, split_key: str) -> Optional[str]:
    for k in (f"{split_key}_label", f"{split_key}_labels", f"y_{split_key}"):
        if k in data:
            return k
    return None


def load_mnistm_pickle(path: os.PathLike | str) -> Dict[str, Tuple[np.ndarray, Optional[np.ndarray]]]:
    """``{"train": (images uint8 [N,28,28,3], labels int64 [N] or None), "test": ...}`` from an
    index-aligned pickle (see the module docstring for the accepted keys)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: MNIST-M pickle not found (build one with tools/make_mnistm.py)")
    try:
        with open(path, "rb") as f:
            data = _ArrayUnpickler(io.BufferedReader(f)).load()
    except (pickle.UnpicklingError, EOFError, ValueError, UnicodeDecodeError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: not a readable MNIST-M pickle ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a dict of arrays, got {type(data).__name__}")
    test_key = "test" if "test" in data else "val" if "val" in data else None
    if "train" not in data or test_key is None:
        raise ValueError(f"{path}: expected keys 'train' and 'test' (or 'val'), found {sorted(map(str, data))}")
    out: Dict[str, Tuple[np.ndarray, Optional[np.ndarray]]] = {}
    for split, key in (("train", "train"), ("test", test_key)):
        images = np.asarray(data[key])
        lk = _label_key(data, key)
        labels = None if lk is None else np.asarray(data[lk]).astype(np.int64).reshape(-1)
        if split == "train" and "valid" in data and test_key == "test" and lk is None:
            # DANN-era layout: TensorFlow's MNIST reader held out the first 5000 training images
            images = np.concatenate([np.asarray(data["valid"]), images])
        if images.ndim != 4 or images.shape[1:] != (28, 28, 3):
            raise ValueError(f"{path}: '{key}' must be uint8 images [N, 28, 28, 3], got {images.dtype} {images.shape}")
        if labels is not None and len(labels) != len(images):
            raise ValueError(f"{path}: '{key}' has {len(images)} images but {len(labels)} labels")
        out[split] = (as_uint8_images(images, f"{path}: '{key}'"), labels)
    return out


def save_mnistm_pickle(path: os.PathLike | str, splits: Dict[str, Tuple[np.ndarray, np.ndarray]],
                       meta: Optional[dict] = None) -> None:
    """Write the index-aligned pickle (keys ``train``, ``train_label``, ``test``, ``test_label``,
    ``meta``), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload: dict = {}
    for split, (images, labels) in splits.items():
        payload[split] = np.ascontiguousarray(images, dtype=np.uint8)
        payload[f"{split}_label"] = np.asarray(labels, dtype=np.int64)
    if meta:
        payload["meta"] = {k: str(v) for k, v in meta.items()}
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        pickle.dump(payload, f, protocol=4)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- PNG folders
def find_mnistm_folder(root: os.PathLike | str, split: str) -> Tuple[Path, Path]:
    """``(png folder, labels txt)`` of ``split`` under ``root`` (``root`` or ``root/mnist_m``)."""
    root = Path(root)
    for base in (root, root / "mnist_m"):
        folder, labels = base / f"mnist_m_{split}", base / f"mnist_m_{split}_labels.txt"
        if folder.is_dir() and labels.is_file():
            return folder, labels
    raise FileNotFoundError(f"MNIST-M PNG folders not found under {root}: expected mnist_m_{split}/ and "
                            f"mnist_m_{split}_labels.txt in {root} or {root / 'mnist_m'}")


def load_mnistm_folder(root: os.PathLike | str, split: str = "train") -> Tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [N,28,28,3], labels int64 [N])`` in the order of the labels file."""
    from PIL import Image

    folder, labels_txt = find_mnistm_folder(root, split)
    names, labels = [], []
    for lineno, line in enumerate(labels_txt.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise ValueError(f"{labels_txt}:{lineno}: expected '<file>.png <label>', got {line!r}")
        names.append(parts[0])
        labels.append(int(parts[1]))
    images = np.empty((len(names), 28, 28, 3), dtype=np.uint8)
    for i, name in enumerate(names):
        p = folder / name
        if not p.is_file():
            raise FileNotFoundError(f"{labels_txt} lists {name}, but {p} does not exist")
        with Image.open(p) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
        if arr.shape != (28, 28, 3):
            raise ValueError(f"{p}: expected a 28x28 image, got {arr.shape[1]}x{arr.shape[0]}")
        images[i] = arr
    labels_arr = np.asarray(labels, dtype=np.int64)
    if labels_arr.size and (labels_arr.min() < 0 or labels_arr.max() > 9):
        raise ValueError(f"{labels_txt}: labels must be in 0..9")
    return images, labels_arr


def pair_by_class(labels_a: np.ndarray, labels_b: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For each row of B, a row of A with the same label (drawn without replacement per class
    while possible, then cycling): ``a[pair[i]]`` pairs with ``b[i]``. For MNIST-M sets that
    are not index-aligned with MNIST."""
    pair = np.empty(len(labels_b), dtype=np.int64)
    for c in np.unique(labels_b):
        rows_b = np.flatnonzero(labels_b == c)
        rows_a = np.flatnonzero(labels_a == c)
        if not len(rows_a):
            raise ValueError(f"class {c} occurs in modality B but not in modality A")
        reps = -(-len(rows_b) // len(rows_a))
        pool = np.concatenate([rng.permutation(rows_a) for _ in range(reps)])
        pair[rows_b] = pool[:len(rows_b)]
    return pair


def images_to_rows(images: np.ndarray, channels_first: bool = True) -> np.ndarray:
    """uint8 ``[N, 28, 28(, 3)]`` -> float32 ``[N, D]`` in [0, 1]; RGB flattened channel-first,
    as torchvision's ToTensor followed by ``view(-1, 3*28*28)`` in the authors' code."""
    x = np.asarray(images, dtype=np.float32) / 255.0
    if x.ndim == 4 and channels_first:
        x = x.transpose(0, 3, 1, 2)
    return x.reshape(len(x), -1)
