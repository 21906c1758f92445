"""Config loading: _base_ inheritance, overrides, validation errors naming key and file."""
from pathlib import Path

import pytest

from pcseg_kd.config import ConfigError, load_config, load_config_with_provenance
from pcseg_kd.engine.toy.schema import load_experiment
from pcseg_kd.registry import Registry

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, name, text):
    p = tmp_path / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def test_base_inheritance_and_overrides(tmp_path):
    write(tmp_path, "base.yaml", "a: 1\nb: {c: 2, d: 3}\n")
    child = write(tmp_path, "sub/child.yaml", "_base_: ../base.yaml\nb: {c: 5}\n")
    cfg, prov = load_config_with_provenance(child, ["b.d=7", "e=[1,2]"])
    assert cfg.a == 1 and cfg.b.c == 5 and cfg.b.d == 7 and list(cfg.e) == [1, 2]
    assert prov["a"].endswith("base.yaml") and prov["b.c"].endswith("child.yaml") and prov["b.d"] == "command line"


def test_delete_replaces_instead_of_merging(tmp_path):
    write(tmp_path, "base.yaml", "distiller: {type: kd, temperature: 4}\n")
    child = write(tmp_path, "child.yaml", "_base_: base.yaml\ndistiller: {_delete_: true, type: dkd}\n")
    assert dict(load_config(child).distiller) == {"type": "dkd"}


def test_missing_base_and_cycles(tmp_path):
    a = write(tmp_path, "a.yaml", "_base_: nope.yaml\n")
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(a)
    write(tmp_path, "x.yaml", "_base_: y.yaml\n")
    y = write(tmp_path, "y.yaml", "_base_: x.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config(y)


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(ROOT / "configs/gauss/kd.yaml", ["seeds.num"])


def test_unknown_key_names_key_and_file(tmp_path):
    p = write(tmp_path, "bad.yaml", f"_base_: {ROOT / 'configs/gauss/kd.yaml'}\ndistiller: {{temprature: 2.0}}\n")
    with pytest.raises(ConfigError) as e:
        load_experiment(str(p))
    msg = str(e.value)
    assert "distiller.temprature" in msg and "bad.yaml" in msg and "temperature" in msg


def test_unknown_top_level_and_section_keys():
    with pytest.raises(ConfigError, match=r"command line: seedz: unknown key"):
        load_experiment(str(ROOT / "configs/gauss/kd.yaml"), ["seedz=3"])
    with pytest.raises(ConfigError, match=r"student.learning_rate: unknown key"):
        load_experiment(str(ROOT / "configs/gauss/kd.yaml"), ["student.learning_rate=3"])


def test_wrong_types_are_reported():
    with pytest.raises(ConfigError, match=r"seeds.num: expected int, got str"):
        load_experiment(str(ROOT / "configs/gauss/kd.yaml"), ["seeds.num=many"])
    with pytest.raises(ConfigError, match=r"distiller.temperature: expected float"):
        load_experiment(str(ROOT / "configs/gauss/kd.yaml"), ["distiller.temperature=hot"])
    with pytest.raises(ConfigError, match=r"task.overlap: expected int"):
        load_experiment(str(ROOT / "configs/gauss/kd.yaml"), ["task.overlap=1.5"])


def test_unknown_registry_type():
    with pytest.raises(ConfigError, match=r"distiller.type: unknown distiller type 'kdd'"):
        load_experiment(str(ROOT / "configs/gauss/kd.yaml"), ["distiller.type=kdd"])


def test_int_accepted_for_float_and_defaults_filled():
    cfg = load_experiment(str(ROOT / "configs/gauss/kd.yaml"), ["distiller.temperature=1"])
    assert cfg["distiller"]["temperature"] == 1
    assert cfg["student"]["momentum"] == 0.0 and cfg["device"] == "cpu"


@pytest.mark.parametrize("path", sorted(str(p) for p in (ROOT / "configs").rglob("*.yaml")
                                        if not p.name.startswith("_") and "kitti" not in str(p)))
def test_every_shipped_toy_config_validates(path):
    text = Path(path).read_text()
    if "task:" not in text and "_base_" not in text:
        pytest.skip("not an experiment config")
    load_experiment(path)


def test_registry_build_and_errors():
    reg = Registry("thing")

    @reg.register_module("a")
    def make_a(x: int = 1):
        return ("a", x)

    assert reg.build({"type": "a", "x": 3}) == ("a", 3)
    assert reg.build({"type": "a"}, x=5) == ("a", 5)
    with pytest.raises(KeyError, match="unknown thing type 'b'"):
        reg.build({"type": "b"})
    with pytest.raises(KeyError, match="already registered"):
        reg.register_module("a", module=lambda: None)
    with pytest.raises(TypeError, match="'type' key"):
        reg.build({"x": 1})


def test_delete_in_a_later_sibling_base(tmp_path):
    write(tmp_path, "a.yaml", "distiller: {type: kd, temperature: 4}\n")
    write(tmp_path, "b.yaml", "distiller: {_delete_: true, type: dkd, alpha: 2}\n")
    c = write(tmp_path, "c.yaml", "_base_: [a.yaml, b.yaml]\n")
    assert dict(load_config(c).distiller) == {"type": "dkd", "alpha": 2}


def test_engine_injected_model_args_are_rejected():
    with pytest.raises(ConfigError, match=r"model.in_dim: set by the engine"):
        load_experiment(str(ROOT / "configs/gauss/kd.yaml"), ["model.in_dim=5"])


@pytest.mark.parametrize("override,message", [
    ("distiller.normalize=kep", "normalize must be 'batch' or 'kept'"),
    ("distiller.pssm.tuo=0.9", "unknown PSSM option"),
    ("distiller.pssm.preset=papr", "unknown PSSM preset"),
    ("distiller.pssm.tau=high", "pssm.tau must be a number"),
    ("distiller.pssm.detach=maybe", "pssm.detach must be a bool"),
    ("distiller.pssm.below=2", r"pssm.below must be in \[0, 1\]"),
    ("distiller.temperature=0", "temperature must be > 0"),
    ("student.optimizer=adamw", "optimizer must be 'sgd' or 'adam'"),
    ("teacher.epochs=0", "epochs >= 1"),
    ("student.batch_size=0", "batch_size must be >= 1"),
    ("seeds.num=0", "seeds.num must be >= 1"),
    ("model.activation=gelu", "activation must be one of"),
])
def test_bad_values_fail_at_load_time_naming_the_source(override, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_experiment(str(ROOT / "configs/sklearn/dkd_pssm.yaml"), [override])
    assert "command line" in str(e.value)
