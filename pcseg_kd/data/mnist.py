"""MNIST in its raw IDX form (what torchvision keeps in ``MNIST/raw/``), read from disk.

Nothing here downloads: when the files are missing the error names the folders that
were searched and the files expected there (see docs/mnist.md for where to get them).

IDX layout (LeCun): 2 zero bytes, a type code (0x08 = uint8, ...), the number of dims,
then each dim as a big-endian uint32, then the data big-endian. Files may be plain or
gzip-compressed (``.gz``).
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

# type code -> big-endian numpy dtype
IDX_DTYPES = {0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
MNIST_SIZES = {"train": 60000, "test": 10000}


class IDXFormatError(ValueError):
    """A malformed IDX file; the message names the file."""


def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as f:
        head = f.read(2)
    try:
        if head == b"\x1f\x8b":  # gzip magic, whatever the suffix says
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (EOFError, OSError, gzip.BadGzipFile) as e:
        raise IDXFormatError(f"{path}: cannot decompress gzip data ({e}); the file is truncated or corrupt") from None


def parse_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Parse IDX bytes into a native-endian array; ``name`` is used in error messages."""
    if len(data) < 4:
        raise IDXFormatError(f"{name}: {len(data)} bytes, too short for an IDX header (4 bytes)")
    if data[0] != 0 or data[1] != 0:
        raise IDXFormatError(f"{name}: bad IDX magic number 0x{data[:4].hex()} (must start with two zero "
                             f"bytes); not an IDX file (e.g. an HTML error page saved in its place?)")
    code, ndim = data[2], data[3]
    if code not in IDX_DTYPES:
        raise IDXFormatError(f"{name}: bad IDX magic number 0x{data[:4].hex()}: unknown type code 0x{code:02x} "
                             f"(known: {', '.join(f'0x{c:02x}' for c in IDX_DTYPES)})")
    if ndim == 0:
        raise IDXFormatError(f"{name}: IDX header declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IDXFormatError(f"{name}: truncated IDX header: {ndim} dims need {header} bytes, file has {len(data)}")
    shape = tuple(int(v) for v in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = IDX_DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    found = len(data) - header
    if found < expected:
        raise IDXFormatError(f"{name}: truncated IDX data: shape {shape} of {dtype.name} needs {expected} bytes "
                             f"after the header, found {found}")
    if found > expected:
        raise IDXFormatError(f"{name}: {found - expected} unexpected bytes after the IDX data of shape {shape}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def read_idx(path: os.PathLike | str) -> np.ndarray:
    """Read one IDX file (plain or gzip)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: IDX file not found")
    return parse_idx(_read_bytes(path), str(path))


def write_idx(path: os.PathLike | str, array: np.ndarray, compress: Optional[bool] = None) -> None:
    """Write ``array`` as IDX (gzip when ``compress`` or the name ends in .gz); for tests and tools."""
    path = Path(path)
    array = np.asarray(array)
    codes = {v.newbyteorder("="): k for k, v in IDX_DTYPES.items()}
    native = array.dtype.newbyteorder("=")
    if native not in codes:
        raise TypeError(f"IDX cannot store dtype {array.dtype}")
    body = bytes([0, 0, codes[native], array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    body += array.astype(IDX_DTYPES[codes[native]]).tobytes()
    if compress if compress is not None else path.suffix == ".gz":
        body = gzip.compress(body, mtime=0)
    path.write_bytes(body)


# ----------------------------------------------------------------------------- MNIST
def mnist_search_dirs(root: os.PathLike | str) -> List[Path]:
    """Folders tried, in order: root itself, torchvision's ``root/MNIST/raw``, ``root/raw``."""
    root = Path(root)
    return [root, root / "MNIST" / "raw", root / "raw"]


def _candidates(stem: str) -> List[str]:
    # Some mirrors write "train-images.idx3-ubyte" (a dot instead of the dash).
    dotted = stem.replace("-idx", ".idx")
    return [stem, stem + ".gz", dotted, dotted + ".gz"]


def find_mnist_file(root: os.PathLike | str, stem: str) -> Optional[Path]:
    for folder in mnist_search_dirs(root):
        for name in _candidates(stem):
            p = folder / name
            if p.is_file():
                return p
    return None


def missing_mnist_message(root: os.PathLike | str, missing: List[str]) -> str:
    dirs = ", ".join(str(d) for d in mnist_search_dirs(root))
    expected = ", ".join(f"{stem}[.gz]" for pair in MNIST_FILES.values() for stem in pair)
    return (f"MNIST not found under {root}: missing {', '.join(missing)}. Looked in: {dirs}. Put the four raw "
            f"IDX files ({expected}) in one of those folders (torchvision's MNIST/raw/ works as is); this "
            f"code never downloads data. See docs/mnist.md, or use the embedded 'digits' task, which needs no files.")


def load_mnist(root: os.PathLike | str, split: str = "train", check_size: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [N, 28, 28], labels int64 [N])`` of MNIST ``split`` ("train" | "test")."""
    if split not in MNIST_FILES:
        raise ValueError(f"MNIST split must be 'train' or 'test', got {split!r}")
    stems = MNIST_FILES[split]
    paths = [find_mnist_file(root, s) for s in stems]
    missing = [s for s, p in zip(stems, paths) if p is None]
    if missing:
        raise FileNotFoundError(missing_mnist_message(root, missing))
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise IDXFormatError(f"{paths[0]}: expected uint8 images of shape [N, 28, 28], got {images.dtype} "
                             f"{images.shape}")
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise IDXFormatError(f"{paths[1]}: expected uint8 labels of shape [N], got {labels.dtype} {labels.shape}")
    if len(images) != len(labels):
        raise IDXFormatError(f"{paths[0]} has {len(images)} images but {paths[1]} has {len(labels)} labels")
    if labels.size and labels.max() > 9:
        raise IDXFormatError(f"{paths[1]}: label {int(labels.max())} outside 0..9")
    if check_size and len(images) != MNIST_SIZES[split]:
        raise IDXFormatError(f"{paths[0]}: {len(images)} images, MNIST {split} has {MNIST_SIZES[split]} "
                             f"(pass check_size=False for a subset)")
    return images, labels.astype(np.int64)


def load_mnist_splits(root: os.PathLike | str, check_size: bool = True) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    return {split: load_mnist(root, split, check_size) for split in MNIST_FILES}
