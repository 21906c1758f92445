"""tools/kitti_table.py's engine: teachers trained once, the no-KD column once for all rows,
students against their row's teacher, the Markdown table, resuming by cell."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pcseg_kd.models.sparse.spconv_compat import HAVE_SPCONV

pytestmark = pytest.mark.skipif(not HAVE_SPCONV, reason="spconv is not installed (pip install 'pcseg_kd[spconv]')")

from pcseg_kd.config import ConfigError  # noqa: E402
from pcseg_kd.engine.distributed import DistEnv  # noqa: E402
from pcseg_kd.engine.kitti.table import cell_configs, load_table, run_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
POINT = "{base_channels: 8, channels: [8, 8, 8, 8, 8, 8, 8, 8], layers: [1, 1, 1, 1, 1, 1, 1, 1], stem_kernel: 3}"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from pcseg_kd.data.kitti.testing import tiny_synthetic
    return tiny_synthetic(tmp_path_factory.mktemp("kitti_table"), sequences=("00", "08"), frames=2, seed=9)


def write_table(tmp_path, root, **extra):
    common = [f"data.train.root={root}", f"data.val.root={root}", "data.synthetic=null", "data.num_workers=0",
              "data.train.voxel_size=[0.3,0.3,0.3]", "data.val.voxel_size=[0.3,0.3,0.3]",
              f"student.model={POINT}", "teacher.optim.epochs=1", "student.optim.epochs=1",
              "teacher.optim.max_steps_per_epoch=1", "student.optim.max_steps_per_epoch=1"]
    text = {
        "experiment": "semantickitti_table", "name": "tiny", "base": str(ROOT / "configs/kitti/quickstart.yaml"),
        "overrides": common,
        "teachers": {"img": ["teacher.model={_delete_: true, type: resnet_fcn, widths: [8, 8, 8, 8], "
                             "depths: [1, 1, 1, 1], decoder_channels: 8}",
                             "teacher.loss_weights={_delete_: true, logits: 1.0}"],
                     "fus": []},
        "methods": {"none": ["distiller={_delete_: true, type: none}"], "pssm": []},
        "paper": {"img": {"none": 59.68}}, **extra}
    path = tmp_path / "table.yaml"
    path.write_text(json.dumps(text))  # JSON is YAML
    return path


def test_table_runs_each_cell_once_per_seed_and_writes_markdown(data_root, tmp_path, capsys):
    table = load_table(str(write_table(tmp_path, data_root, seeds=[0, 1])))
    runs = cell_configs(table, tmp_path / "w")
    one_seed = [("img", "teacher"), ("fus", "teacher"), ("*", "none"), ("img", "pssm"), ("fus", "pssm")]
    assert [(r["row"], r["col"]) for r in runs] == one_seed * 2
    assert [r["seed"] for r in runs] == [0] * 5 + [1] * 5 and runs[7]["cfg"]["seed"] == 1
    assert runs[3]["cfg"]["teacher_checkpoint"].endswith("seed0/teachers/img/teacher/final.pt")
    assert runs[8]["cfg"]["teacher_checkpoint"].endswith("seed1/teachers/img/teacher/final.pt")
    assert runs[1]["cfg"]["teacher"]["model"]["type"] == "fusion_teacher"
    assert runs[0]["cfg"]["teacher"]["model"]["type"] == "resnet_fcn"
    res = run_table(table, tmp_path / "w", DistEnv(), progress=False)
    assert set(res) == {"img", "fus"} and res["img"]["none"] == res["fus"]["none"]  # one shared baseline
    for row in res.values():
        for cell in row.values():
            vals = list(cell["by_seed"].values())
            assert cell["n"] == 2 and cell["mean"] == pytest.approx(sum(vals) / 2)
            assert cell["std"] == pytest.approx(abs(vals[0] - vals[1]) / 2 ** 0.5)
    for row in ("img", "fus"):  # the paired Δ to the no-KD student of the same seed
        cell, base = res[row]["pssm"], res[row]["none"]
        diffs = [cell["by_seed"][k] - base["by_seed"][k] for k in ("0", "1")]
        assert cell["delta"]["n"] == 2 and cell["delta"]["mean"] == pytest.approx(sum(diffs) / 2)
        assert cell["delta_ci95"] == [cell["delta"]["low"], cell["delta"]["high"]]
        assert "delta" not in base and "delta" not in res[row]["teacher"]
    md = (tmp_path / "w" / "results.md").read_text()
    assert "| teacher | teacher | none | pssm | best Δ vs none |" in md
    assert "## Paired Δ to none" in md and "(n=2, 95 % CI [" in md
    none = res["img"]["none"]
    assert f"{none['mean']:.2f} ± {none['std']:.2f} (59.68)" in md and "over seeds [0, 1]" in md
    assert json.loads((tmp_path / "w" / "results.json").read_text()) == res
    final = tmp_path / "w" / "seed1" / "students" / "img-pssm" / "student" / "final.pt"
    stamp = final.stat().st_mtime_ns
    capsys.readouterr()
    assert run_table(table, tmp_path / "w", DistEnv(), progress=False) == res  # finished cells are skipped
    assert final.stat().st_mtime_ns == stamp
    assert f"resuming: 10 of 10 cells done ({tmp_path / 'w'})" in capsys.readouterr().out


def test_every_no_kd_column_gets_its_own_run(data_root, tmp_path):
    table = load_table(str(write_table(tmp_path, data_root, methods={
        "none": ["distiller={_delete_: true, type: none}"],
        "none-long": ["distiller={_delete_: true, type: none}", "student.optim.epochs=2"]})))
    cols = [(r["row"], r["col"]) for r in cell_configs(table, tmp_path / "w")]
    assert cols == [("img", "teacher"), ("fus", "teacher"), ("*", "none"), ("*", "none-long")]


def test_table_config_errors(data_root, tmp_path):
    with pytest.raises(ConfigError, match="metric must be"):
        load_table(str(write_table(tmp_path, data_root, metric="everything")))
    with pytest.raises(ConfigError, match="seeds must be"):
        load_table(str(write_table(tmp_path, data_root, seeds=[1, 1])))
    with pytest.raises(ConfigError, match="teachers and methods"):
        load_table(str(write_table(tmp_path, data_root, methods={})))
    bad = load_table(str(write_table(tmp_path, data_root, methods={"x": ["distiller.betta=3"]})))
    with pytest.raises(ConfigError, match="distiller.betta"):
        cell_configs(bad, tmp_path / "w")


def test_markdown_gives_each_paired_delta_with_its_interval():
    from pcseg_kd.engine.kitti.table import add_paired_deltas, markdown, summarise

    table = {"name": "x", "methods": {"none": [], "pssm": [], "kd": []}, "paper": {}, "seeds": [0, 1, 2],
             "metric": "in_view"}
    res = {"img": {"teacher": summarise({0: 50, 1: 51, 2: 52}), "none": summarise({0: 30, 1: 31, 2: 33}),
                   "pssm": summarise({0: 32, 1: 33.2, 2: 34.9}), "kd": summarise({0: 29, 1: None, 2: 33})}}
    add_paired_deltas(res, "none")
    # pssm − none per seed: 2.0, 2.2, 1.9; t(0.975, 2) = 4.303
    d = res["img"]["pssm"]["delta"]
    assert d["mean"] == pytest.approx(2.0333333) and d["std"] == pytest.approx(0.1527525)
    assert res["img"]["pssm"]["delta_ci95"] == pytest.approx([2.0333333 - 4.3026527 * 0.1527525 / 3 ** 0.5,
                                                              2.0333333 + 4.3026527 * 0.1527525 / 3 ** 0.5])
    assert res["img"]["kd"]["delta"]["n"] == 2  # seed 1 produced no kd value: paired over seeds 0 and 2
    md = markdown(table, res, "none")
    assert "| img | +2.03 ± 0.15 (n=3, 95 % CI [+1.65, +2.41]) * | -0.50 ± 0.71 (n=2, 95 % CI [-6.85, +5.85]) |" in md
    assert md.splitlines()[4].endswith("| +2.03 ± 0.15 (n=3, 95 % CI [+1.65, +2.41]) * |")  # the best method's Δ
