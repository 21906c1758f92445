"""MNIST IDX reader, MNIST-M blending/readers/builder, the embedded digits set, and the
teacher-input noise. All data are generated here (tiny IDX files, PNGs, photos)."""
from __future__ import annotations

import gzip
import io
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pcseg_kd.data.mnist import IDXFormatError, load_mnist, read_idx, write_idx
from pcseg_kd.data.mnistm import (blend_mnistm, load_mnistm_folder, load_mnistm_pickle, pair_by_class,
                                  save_mnistm_pickle)
from pcseg_kd.data import mnist_task as mt
from pcseg_kd.registry import TASKS

REPO = Path(__file__).resolve().parents[1]


def idx_bytes(array: np.ndarray, code: int = 0x08) -> bytes:
    """IDX by hand (struct, independent of write_idx): magic 0 0 code ndim, dims, data."""
    head = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return head + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_tiny_mnist(folder: Path, n_train=12, n_test=6, gz=False, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        images[images < 128] = 0  # MNIST-like: mostly background
        labels = (np.arange(n) % 10).astype(np.uint8)
        suffix = ".gz" if gz else ""
        for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
            data = idx_bytes(arr)
            (folder / f"{split}-{kind}-ubyte{suffix}").write_bytes(gzip.compress(data) if gz else data)
        out["train" if split == "train" else "test"] = (images, labels)
    return out


# ----------------------------------------------------------------------------- IDX
@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_hand_written(tmp_path, gz):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    p = tmp_path / ("a.idx.gz" if gz else "a.idx")
    p.write_bytes(gzip.compress(idx_bytes(a)) if gz else idx_bytes(a))
    got = read_idx(p)
    assert got.dtype == np.uint8 and np.array_equal(got, a)


def test_read_idx_other_dtypes_big_endian(tmp_path):
    a = np.array([[1, -2, 300], [70000, 5, -6]], dtype=np.int32)
    (tmp_path / "i").write_bytes(idx_bytes(a, 0x0C))
    assert np.array_equal(read_idx(tmp_path / "i"), a)
    f = np.array([1.5, -2.25], dtype=np.float32)
    (tmp_path / "f").write_bytes(idx_bytes(f, 0x0D))
    assert np.array_equal(read_idx(tmp_path / "f"), f)
    write_idx(tmp_path / "w.gz", a)  # the writer agrees with the hand-written format
    assert gzip.decompress((tmp_path / "w.gz").read_bytes()) == idx_bytes(a, 0x0C)


@pytest.mark.parametrize("data, match", [
    (b"\x01\x00\x08\x01" + struct.pack(">I", 2) + b"\x00\x00", "bad IDX magic number"),
    (b"<htm", "bad IDX magic number"),
    (b"\x00\x00\x07\x01" + struct.pack(">I", 2) + b"\x00\x00", "unknown type code"),
    (b"\x00\x00\x08\x03" + struct.pack(">I", 2), "truncated IDX header"),
    (b"\x00\x00\x08\x02" + struct.pack(">II", 2, 3) + b"\x00" * 5, "truncated IDX data"),
    (b"\x00\x00\x08\x01" + struct.pack(">I", 2) + b"\x00" * 3, "unexpected bytes"),
    (b"\x00\x00", "too short"),
])
def test_malformed_idx_names_the_file(tmp_path, data, match):
    p = tmp_path / "train-images-idx3-ubyte"
    p.write_bytes(data)
    with pytest.raises(IDXFormatError, match=match) as e:
        read_idx(p)
    assert str(p) in str(e.value)


def test_truncated_gzip_names_the_file(tmp_path):
    p = tmp_path / "t10k-labels-idx1-ubyte.gz"
    p.write_bytes(gzip.compress(idx_bytes(np.zeros(100, np.uint8)))[:20])
    with pytest.raises(IDXFormatError, match="truncated or corrupt") as e:
        read_idx(p)
    assert str(p) in str(e.value)


@pytest.mark.parametrize("layout", [".", "MNIST/raw", "raw"])
@pytest.mark.parametrize("gz", [False, True])
def test_load_mnist_layouts(tmp_path, layout, gz):
    want = write_tiny_mnist(tmp_path / layout, gz=gz)
    for split in ("train", "test"):
        images, labels = load_mnist(tmp_path, split, check_size=False)
        assert np.array_equal(images, want[split][0]) and np.array_equal(labels, want[split][1])
        assert labels.dtype == np.int64
    with pytest.raises(IDXFormatError, match="MNIST train has 60000"):
        load_mnist(tmp_path, "train")


def test_missing_mnist_says_where_and_what(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_mnist(tmp_path / "nowhere", "test")
    msg = str(e.value)
    for piece in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", "train-images-idx3-ubyte[.gz]",
                  str(tmp_path / "nowhere" / "MNIST" / "raw"), "never downloads"):
        assert piece in msg


def test_mnist_image_label_count_mismatch(tmp_path):
    write_tiny_mnist(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(5, np.uint8)))
    with pytest.raises(IDXFormatError, match="12 images but .* 5 labels"):
        load_mnist(tmp_path, "train", check_size=False)


# ----------------------------------------------------------------------------- MNIST-M blending
def position_photo(h, w, tag):
    """Photo whose pixel (y, x) is (y, x, tag): a crop reveals which photo and where."""
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return np.stack([yy, xx, np.full_like(yy, tag)], -1).astype(np.uint8)


def test_blending_rule():
    rng = np.random.default_rng(0)
    digits = rng.integers(0, 256, (60, 28, 28)).astype(np.uint8)
    digits[digits < 100] = 0
    sizes = {7: (40, 60), 9: (31, 33)}
    photos = [position_photo(*sizes[7], 7), position_photo(*sizes[9], 9)]
    out = blend_mnistm(digits, photos, np.random.default_rng(1))
    used = set()
    for img, dig in zip(out, digits):
        ink = dig > 0
        assert (~ink).any()
        ys, xs = np.nonzero(~ink)
        tag = int(img[ys[0], xs[0], 2])  # the background shows the photo itself
        y0, x0 = int(img[ys[0], xs[0], 0]) - ys[0], int(img[ys[0], xs[0], 1]) - xs[0]
        h, w = sizes[tag]
        assert 0 <= y0 < h - 28 and 0 <= x0 < w - 28  # numpy's exclusive upper bound, as the original
        crop = photos[[7, 9].index(tag)][y0:y0 + 28, x0:x0 + 28].astype(int)
        want = np.abs(crop - 255 * ink[..., None])  # |crop - digit| with the digit binarised at > 0
        assert np.array_equal(img.astype(int), want)
        used.add(tag)
    assert used == {7, 9}


def test_blending_threshold_and_determinism():
    digits = np.full((3, 28, 28), 100, np.uint8)
    photo = [np.full((30, 30, 3), 40, np.uint8)]
    assert (blend_mnistm(digits, photo, np.random.default_rng(0), threshold=0) == 215).all()
    assert (blend_mnistm(digits, photo, np.random.default_rng(0), threshold=100) == 40).all()
    rand = np.random.default_rng(5).integers(0, 256, (20, 28, 28)).astype(np.uint8)
    photos = [np.random.default_rng(6).integers(0, 256, (50, 70, 3)).astype(np.uint8)]
    a = blend_mnistm(rand, photos, np.random.default_rng(3))
    assert np.array_equal(a, blend_mnistm(rand, photos, np.random.default_rng(3)))
    assert not np.array_equal(a, blend_mnistm(rand, photos, np.random.default_rng(4)))
    with pytest.raises(ValueError, match="at least 29x29"):
        blend_mnistm(rand, [np.zeros((28, 40, 3), np.uint8)], np.random.default_rng(0))


def test_make_mnistm_tool_is_reproducible(tmp_path):
    mnist = write_tiny_mnist(tmp_path / "mnist", gz=True)
    photos = tmp_path / "photos" / "sub"
    photos.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("b.png", "a.jpg"):
        Image.fromarray(rng.integers(0, 256, (45, 50, 3)).astype(np.uint8)).save(photos / name)
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(photos / "tiny.png")  # skipped: too small
    outs = []
    for run in range(2):
        out = tmp_path / f"out{run}" / "mnist_m_data.pkl"
        cmd = [sys.executable, str(REPO / "tools" / "make_mnistm.py"), "--mnist-root", str(tmp_path / "mnist"),
               "--photos", str(tmp_path / "photos"), "--out", str(out), "--seed", "3", "--allow-subset"]
        subprocess.run(cmd, check=True, capture_output=True)
        outs.append(load_mnistm_pickle(out))
    for split in ("train", "test"):
        images, labels = outs[0][split]
        assert images.shape == (len(mnist[split][0]), 28, 28, 3) and images.dtype == np.uint8
        assert np.array_equal(images, outs[1][split][0])
        assert np.array_equal(labels, mnist[split][1])
        ink = mnist[split][0] > 0  # index-aligned: the strokes of MNIST image i are in MNIST-M image i
        assert ink.any()
    # the task reads the result, paired row by row with MNIST
    task = TASKS.build({"type": "mnist", "root": str(tmp_path / "mnist"), "mnistm": str(out), "check_size": False})
    data = task.make_data([0])
    assert data["x_a_train"].shape == (1, 12, 784) and data["x_b_train"].shape == (1, 12, 3 * 784)
    assert torch.equal(data["y_train"][0], torch.from_numpy(mnist["train"][1].astype(np.int64)))


# ----------------------------------------------------------------------------- MNIST-M readers
def test_pickle_reader_formats(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, (8, 28, 28, 3)).astype(np.uint8)
    # the authors' layout: train / train_label / val / val_label
    p = tmp_path / "authors.pkl"
    with open(p, "wb") as f:
        pickle.dump({"train": imgs[:5], "train_label": np.arange(5), "val": imgs[5:], "val_label": np.arange(3)}, f)
    got = load_mnistm_pickle(p)
    assert np.array_equal(got["test"][0], imgs[5:]) and np.array_equal(got["train"][1], np.arange(5))
    # DANN layout: train / valid / test, no labels; valid (TF's first 5000) goes first
    p = tmp_path / "dann.pkl"
    with open(p, "wb") as f:
        pickle.dump({"train": imgs[2:6], "valid": imgs[:2], "test": imgs[6:]}, f)
    got = load_mnistm_pickle(p)
    assert np.array_equal(got["train"][0], imgs[:6]) and got["train"][1] is None
    # our writer round-trips
    save_mnistm_pickle(tmp_path / "ours.pkl", {"train": (imgs[:4], np.arange(4)), "test": (imgs[4:], np.arange(4))})
    assert np.array_equal(load_mnistm_pickle(tmp_path / "ours.pkl")["train"][0], imgs[:4])


class _Py2Pickler(pickle._Pickler):
    """Writes every str/bytes as Python 2's 8-bit ``str`` (SHORT_BINSTRING / BINSTRING), the
    way a Python 2 ``cPickle.dump(..., protocol=2)`` stores numpy's array data."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj):
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str
    dispatch[str] = _save_py2_str


def py2_pickle_bytes(obj) -> bytes:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    # numpy 1.x (all Python 2 numpys) lived under numpy.core
    return buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def _bright_images(n, seed=0):
    return np.random.default_rng(seed).integers(128, 256, (n, 28, 28, 3)).astype(np.uint8)  # bytes > 127


def test_pickle_reader_python2_pickle(tmp_path):
    """Issue 10.4: a Python 2 pickle (8-bit str array data) needs encoding="latin1"."""
    imgs = _bright_images(5)
    raw = py2_pickle_bytes({"train": imgs[:3], "train_label": np.arange(3), "val": imgs[3:], "val_label": np.arange(2)})
    with pytest.raises(UnicodeDecodeError):
        pickle.loads(raw)  # what the default encoding does with it
    p = tmp_path / "py2.pkl"
    p.write_bytes(raw)
    got = load_mnistm_pickle(p)
    assert np.array_equal(got["train"][0], imgs[:3]) and np.array_equal(got["test"][0], imgs[3:])
    assert np.array_equal(got["train"][1], np.arange(3))


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 5])
def test_pickle_reader_every_protocol(tmp_path, protocol):
    """Issue 10.4: Python 3 writes bytes as _codecs.encode(text, "latin1") in protocols <= 2."""
    imgs = _bright_images(4, seed=1)
    p = tmp_path / f"p{protocol}.pkl"
    with open(p, "wb") as f:
        pickle.dump({"train": imgs[:2], "train_label": np.array([3, 4]), "test": imgs[2:],
                     "test_label": np.array([5, 6])}, f, protocol=protocol)
    got = load_mnistm_pickle(p)
    assert np.array_equal(got["train"][0], imgs[:2]) and np.array_equal(got["test"][1], [5, 6])


def test_pickle_reader_float_images(tmp_path):
    """Issue 10.4: float images in [0, 1] were truncated to 0/1; now scaled by 255 (and
    rounded); whole-number floats in [0, 255] are cast; other ranges are refused."""
    imgs = _bright_images(4, seed=2)
    cases = {"unit": imgs.astype(np.float32) / 255.0, "whole": imgs.astype(np.float64)}
    for name, arr in cases.items():
        p = tmp_path / f"{name}.pkl"
        with open(p, "wb") as f:
            pickle.dump({"train": arr[:2], "test": arr[2:]}, f)
        got = load_mnistm_pickle(p)
        assert got["train"][0].dtype == np.uint8
        assert np.array_equal(got["train"][0], imgs[:2]) and np.array_equal(got["test"][0], imgs[2:]), name
    for bad, match in ((imgs.astype(np.float32) / 255.0 - 0.75, "values in"),  # normalised, negative
                       (imgs.astype(np.float32) + 0.5, "values in"),
                       (imgs.astype(np.int32) + 300, "0..255")):
        p = tmp_path / "bad.pkl"
        with open(p, "wb") as f:
            pickle.dump({"train": bad[:2], "test": bad[2:]}, f)
        with pytest.raises(ValueError, match=match):
            load_mnistm_pickle(p)


def test_pickle_reader_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    p = tmp_path / "evil.pkl"
    with open(p, "wb") as f:
        pickle.dump({"train": Evil(), "test": Evil()}, f)
    with pytest.raises(ValueError, match="refusing to unpickle builtins.print"):
        load_mnistm_pickle(p)
    with pytest.raises(FileNotFoundError, match="make_mnistm"):
        load_mnistm_pickle(tmp_path / "missing.pkl")


def test_png_folder_reader_and_class_pairing(tmp_path):
    root = tmp_path / "mnist_m"
    (root / "mnist_m_train").mkdir(parents=True)
    rng = np.random.default_rng(0)
    imgs, lines = [], []
    for i in range(7):
        img = rng.integers(0, 256, (28, 28, 3)).astype(np.uint8)
        Image.fromarray(img).save(root / "mnist_m_train" / f"{i:08d}.png")
        imgs.append(img)
        lines.append(f"{i:08d}.png {i % 3}")
    (root / "mnist_m_train_labels.txt").write_text("\n".join(lines[::-1]) + "\n")  # order = the txt's
    images, labels = load_mnistm_folder(tmp_path, "train")
    assert np.array_equal(images, np.stack(imgs[::-1])) and list(labels) == [i % 3 for i in range(7)][::-1]
    labels_a = np.array([0, 1, 2, 0, 1, 2, 2, 2])
    pair = pair_by_class(labels_a, labels, np.random.default_rng(0))
    assert np.array_equal(labels_a[pair], labels)
    (root / "mnist_m_train_labels.txt").write_text("00000000.png five\n")
    with pytest.raises(ValueError, match="mnist_m_train_labels.txt:1"):
        load_mnistm_folder(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="mnist_m_test"):
        load_mnistm_folder(tmp_path, "test")


# ----------------------------------------------------------------------------- digits default
def test_digits_task_data():
    task = TASKS.build({"type": "digits"})
    data = task.make_data([0, 1])
    assert data["x_a_train"].shape == (1, 1257, 784) and data["x_b_train"].shape == (1, 1257, 2352)
    assert data["x_a_test"].shape == (1, 540, 784) and data["y_test"].shape == (1, 540)
    assert set(data["y_train"].unique().tolist()) == set(range(10))
    for k in ("x_a_train", "x_b_train"):
        assert data[k].min() >= -1 and data[k].max() <= 1  # (x - 0.5) / 0.5
    again = TASKS.build({"type": "digits"}).make_data([0])
    assert all(torch.equal(data[k], again[k]) for k in data)
    other = TASKS.build({"type": "digits", "blend_seed": 1}).make_data([0])
    assert torch.equal(other["x_a_train"], data["x_a_train"]) and not torch.equal(other["x_b_train"], data["x_b_train"])


# ----------------------------------------------------------------------------- noise
def digits_noise_task(**kw):
    return TASKS.build({"type": "digits", "noise_level": 2, **kw})


def test_noise_is_per_sample_per_epoch_and_reproducible():
    task = digits_noise_task()
    x = task.make_data([0])["x_a_train"][0]
    rows = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]])
    a = task.augment(x[rows], "a", 1, [0, 1], rows)
    assert torch.equal(a, task.augment(x[rows], "a", 1, [0, 1], rows))           # reproducible
    assert not torch.equal(a, task.augment(x[rows], "a", 2, [0, 1], rows))       # new every epoch
    assert not torch.equal(a[0], a[1])                                            # per seed
    assert not torch.equal(a[0, 0], a[0, 1])
    other = torch.tensor([[3, 7, 0]])                                             # batch-independent
    b = task.augment(x[other], "a", 1, [1], other)
    assert torch.equal(b[0, 0], a[1, 3]) and torch.equal(b[0, 2], a[1, 0])
    assert torch.equal(task.augment(x[rows], "b", 1, [0, 1], rows), x[rows])      # student clean by default
    assert torch.equal(TASKS.build({"type": "digits"}).augment(x[rows], "a", 1, [0, 1], rows), x[rows])
    test = task.augment(x.unsqueeze(0), "a", 0, [0, 1], None)                     # test set: all rows
    assert test.shape == (2, *x.shape) and torch.equal(test[:, :4], task.augment(x[rows], "a", 0, [0, 1], rows))


@pytest.mark.parametrize("kind, level, scale", [("uniform", 1, 1.0), ("uniform", 0.3, 1.0), ("gaussian", 1, 0.2)])
def test_noise_formula(kind, level, scale):
    """On a black image, x + a·noise clipped: check the noise's distribution."""
    task = TASKS.build({"type": "digits", "noise_level": level, "noise": kind, "noise_scale": scale,
                        "normalize": False})
    x = torch.zeros(1, 2000, 784)
    rows = torch.arange(2000).unsqueeze(0)
    out = task.augment(x, "a", 1, [0], rows)
    amp = level * scale
    if kind == "uniform":
        raw = out.flatten()  # clip(amp·U) on 0: uniform on [0, amp] capped at 1
        want_mean = amp / 2 if amp <= 1 else 1 - 1 / (2 * amp)
        assert raw.mean().item() == pytest.approx(want_mean, abs=2e-3)
        assert raw.min() >= 0 and raw.max() <= min(amp, 1.0)
    else:  # clip(N(0, amp²)) on 0: half the mass at 0, E = amp / sqrt(2π)
        assert (out == 0).double().mean().item() == pytest.approx(0.5, abs=5e-3)
        assert out.mean().item() == pytest.approx(amp / np.sqrt(2 * np.pi), rel=2e-2)
    white = task.augment(torch.ones(1, 10, 784), "a", 1, [0], rows[:, :10])
    assert white.max() <= 1.0


def test_noise_config_errors():
    with pytest.raises(ValueError, match="task.noise must be one of"):
        TASKS.build({"type": "digits", "noise": "salt"})
    with pytest.raises(ValueError, match=">= 0"):
        TASKS.build({"type": "digits", "noise_level": -1})


def test_noise_same_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    task = digits_noise_task(noise="gaussian")
    x = torch.rand(2, 5, 784)
    rows = torch.arange(5).expand(2, 5)
    cpu = task.augment(x, "a", 3, [0, 1], rows)
    gpu = task.augment(x.cuda(), "a", 3, [0, 1], rows.cuda()).cpu()
    assert torch.allclose(cpu, gpu, atol=1e-5)
