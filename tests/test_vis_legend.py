"""The pictures' legends say what grey points are (pcseg_kd/vis.py)."""
import numpy as np
import pytest

from pcseg_kd.vis import OMEGA_GREY, grey_meaning, render_omega, render_scan


def legend_texts(monkeypatch, draw):
    """The legend entries of the figure ``draw()`` saves."""
    from matplotlib.figure import Figure
    seen = []
    real = Figure.savefig

    def capture(fig, *a, **kw):
        legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
        seen.extend(t.get_text() for lg in legends for t in lg.get_texts())
        return real(fig, *a, **kw)

    monkeypatch.setattr(Figure, "savefig", capture)
    draw()
    return seen


def test_grey_meaning_names_each_panel_that_has_grey_points():
    assert grey_meaning({"labels": np.array([0, 1])}, 19) == ""
    assert grey_meaning({"labels": np.array([0, 255])}, 19) == "grey: unlabelled (labels)"
    text = grey_meaning({"labels": np.array([0, 1]), "prediction": np.array([-1, 3])}, 19)
    assert text == "grey: not predicted, raw 0 (prediction)"


def test_scan_and_omega_legends_have_the_grey_entry(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    rng = np.random.default_rng(0)
    pts = rng.uniform(-20, 20, (50, 4)).astype(np.float32)
    colours = rng.integers(0, 255, (19, 3))
    names = [f"c{i}" for i in range(19)]
    labels = np.where(np.arange(50) % 5 == 0, 255, np.arange(50) % 19)
    texts = legend_texts(monkeypatch, lambda: render_scan(pts, {"labels": labels}, colours, names, tmp_path / "a.png"))
    assert "grey: unlabelled (labels)" in texts and "c1" in texts
    n = 30
    texts = legend_texts(monkeypatch, lambda: render_omega(
        np.zeros((20, 60, 3)), rng.uniform(0, 20, (n, 2)), rng.uniform(0, 1, n), np.where(np.arange(n) % 4, 1, 255),
        np.ones(n, int), np.zeros(n, int), tmp_path / "o.png"))
    assert OMEGA_GREY in texts
