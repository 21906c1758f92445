"""One error path for the command-line tools: ``error: ...`` on stderr, exit status 1,
a traceback only with --debug or for a genuine bug."""
import errno
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pcseg_kd.config import ConfigError
from pcseg_kd.data.kitti import KittiDataError
from pcseg_kd.utils import cli
from pcseg_kd.utils.io import read_json

ROOT = Path(__file__).resolve().parents[1]


def _raiser(exc):
    def main(argv):
        main.argv = argv
        raise exc
    return main


@pytest.mark.parametrize("exc, line", [
    (ConfigError("c.yaml: lr: expected float"), "error: c.yaml: lr: expected float"),
    (KittiDataError("/d/x.bin", "empty scan (0 bytes)"), "error: /d/x.bin: empty scan (0 bytes)"),
    (FileNotFoundError("checkpoint /w/final.pt does not exist"), "error: checkpoint /w/final.pt does not exist"),
    (OSError(errno.ENOSPC, "No space left on device", "/w/last.pt"), "error: /w/last.pt: No space left on device"),
    (PermissionError(errno.EACCES, "Permission denied", "/ro/x.json"), "error: /ro/x.json: Permission denied"),
    (OSError(errno.ENOSPC, "cannot write /w/m.json: No space left on device", "/w/m.json"),
     "error: cannot write /w/m.json: No space left on device"),
    (ValueError("bad value"), "error: bad value"),
    (ImportError("model type 'spunet' requires spconv"), "error: model type 'spunet' requires spconv"),
    (FloatingPointError("non-finite loss"), "error: non-finite loss"),
])
def test_expected_failures_are_one_error_line_and_exit_1(capsys, exc, line):
    main = _raiser(exc)
    assert cli.run_main(main, ["a", "b"]) == 1
    err = capsys.readouterr().err
    assert err == line + "\n" and "Traceback" not in err
    assert main.argv == ["a", "b"]
    # --debug: the exception propagates (its traceback is printed by Python), and is not passed to main
    with pytest.raises(type(exc)):
        cli.run_main(main, ["a", "--debug", "b"])
    assert main.argv == ["a", "b"]


def test_a_genuine_bug_keeps_its_traceback_and_exit_statuses_pass_through(capsys):
    with pytest.raises(ZeroDivisionError):
        cli.run_main(_raiser(ZeroDivisionError("bug")), [])
    with pytest.raises(SystemExit):
        cli.run_main(_raiser(SystemExit(2)), [])
    assert cli.run_main(lambda argv: None, []) == 0
    assert cli.run_main(lambda argv: 3, []) == 3
    assert cli.run_main(lambda argv: {"summary": 1}, []) == 0
    assert cli.run_main(_raiser(KeyboardInterrupt()), []) == 130
    assert cli.split_debug(["x", "--", "--debug"]) == (["x", "--", "--debug"], False)


def _tool(name, *args, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / "tools" / name), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def _one_error_line(r, *needles):
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert "Traceback" not in r.stderr, r.stderr
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, r.stderr
    for n in needles:
        assert n in errors[0], errors[0]
    return errors[0]


def test_make_synthetic_kitti_unwritable_out(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    r = _tool("make_synthetic_kitti.py", "--out", blocker / "sub", "--sequences", "00", "--frames", "1",
              "--azimuth-steps", "64", "--render-scale", "0.1")
    _one_error_line(r, str(blocker))
    d = _tool("make_synthetic_kitti.py", "--out", blocker / "sub", "--sequences", "00", "--frames", "1",
              "--azimuth-steps", "64", "--render-scale", "0.1", "--debug")
    assert d.returncode != 0 and "Traceback" in d.stderr


def test_visualize_kitti_bad_scan_and_wrong_image_size(tmp_path):
    from pcseg_kd.data.kitti.testing import write_frame

    p = write_frame(tmp_path)
    good = p["scan"].read_bytes()
    p["scan"].write_bytes(good[:17])
    r = _tool("visualize_kitti.py", "--root", tmp_path, "--frame", "00/000000", "--out", tmp_path / "v.png")
    _one_error_line(r, str(p["scan"]), "not a multiple of 16")
    p["scan"].write_bytes(good)
    write_frame(tmp_path, image_hw=(188, 620))
    r = _tool("visualize_kitti.py", "--root", tmp_path, "--frame", "00/000000", "--out", tmp_path / "v.png")
    _one_error_line(r, str(p["image"]), "620x188")


def test_sweep_bad_config_is_one_line(tmp_path):
    cfg = tmp_path / "s.yaml"
    cfg.write_text("task: {type: gauss}\nno_such_key: 1\n")
    r = _tool("sweep.py", cfg, "--work-dir", tmp_path / "w", timeout=300)
    _one_error_line(r)
    r = _tool("sweep.py", tmp_path / "missing.yaml", "--work-dir", tmp_path / "w")
    _one_error_line(r, "missing.yaml", "not found")


def test_read_json_names_a_damaged_file(tmp_path):
    p = tmp_path / "cell.json"
    p.write_text('{"digest": "ab", "metr')
    with pytest.raises(ValueError, match=f"{p}: not valid JSON"):
        read_json(p)
    with pytest.warns(UserWarning, match=f"{p}: not valid JSON"):
        assert read_json(p, default=None) is None
    assert read_json(tmp_path / "nope.json", default={}) == {}
    p.write_text(json.dumps({"a": [1, None]}))
    assert read_json(p) == {"a": [1, None]}
