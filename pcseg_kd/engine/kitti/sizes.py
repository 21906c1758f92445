"""Size presets of the SemanticKITTI experiments: ``size: tiny`` / ``size: full`` (configs/kitti/_sizes_/).

The teachers spell their widths differently (the fusion teacher: ``teacher.model.point.*`` and
``teacher.model.image.widths``; the image-only teacher: ``teacher.model.widths``), so a preset
holds its teacher settings by ``teacher.model.type`` and the one for the config's teacher is
applied. A preset's values replace the config files' (a config that shrank its models is
restored by ``size=full``); a dotted override on the command line still wins. With
``teacher_checkpoint`` the teacher is left alone: its weights fix its size. After applying,
``size`` is set to null, so that the resolved WORK/config.yaml, read again by the tools, holds
the values the run used and the preset is not applied a second time over the run's own overrides.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping

from ...config import CLI, ConfigError, load_config

SIZES_DIR = Path(__file__).resolve().parents[3] / "configs" / "kitti" / "_sizes_"


def available_sizes() -> List[str]:
    return sorted(p.stem for p in SIZES_DIR.glob("*.yaml"))


def _set_unless_cli(dst: Dict[str, Any], preset: Mapping[str, Any], prov: Mapping[str, str], prefix: str,
                    applied: List[str]) -> None:
    for key, value in preset.items():
        path = f"{prefix}{key}"
        if prov.get(path) == CLI:
            continue
        if isinstance(value, Mapping):
            if not isinstance(dst.get(key), dict):
                dst[key] = {}
            _set_unless_cli(dst[key], value, prov, path + ".", applied)
        else:
            dst[key] = value
            applied.append(path)


def apply_size(cfg: Dict[str, Any], prov: Mapping[str, str], config_path: str = "") -> List[str]:
    """Apply ``cfg["size"]`` in place; returns the dotted keys it set. Errors name the key,
    the preset file and what is wrong."""
    name = cfg.get("size")
    if name is None:
        return []
    where = f"{config_path}: " if config_path else ""
    if not isinstance(name, str) or not (SIZES_DIR / f"{name}.yaml").is_file():
        raise ConfigError(f"{where}size: no preset {name!r} in {SIZES_DIR} (have: {', '.join(available_sizes())})")
    preset_file = SIZES_DIR / f"{name}.yaml"
    preset = _plain(load_config(preset_file))
    teacher = dict(preset.pop("teacher", {}) or {})
    by_type = teacher.pop("model", None) or {}
    applied: List[str] = []
    _set_unless_cli(cfg, preset, prov, "", applied)
    if not cfg.get("teacher_checkpoint"):
        _set_unless_cli(cfg.setdefault("teacher", {}), teacher, prov, "teacher.", applied)
        t_type = (cfg.get("teacher", {}).get("model") or {}).get("type")
        if t_type is not None and ("teacher" in cfg.get("stages", []) or "student" in cfg.get("stages", [])):
            if t_type not in by_type:
                raise ConfigError(f"{where}size: {name}: {preset_file} has no teacher.model preset for "
                                  f"teacher.model.type {t_type!r} (has: {', '.join(sorted(by_type))})")
            _set_unless_cli(cfg["teacher"]["model"], by_type[t_type], prov, "teacher.model.", applied)
    cfg["size"] = None
    return applied


def _plain(tree: Any) -> Any:
    from omegaconf import DictConfig, ListConfig, OmegaConf
    if isinstance(tree, (DictConfig, ListConfig)):
        return OmegaConf.to_container(tree, resolve=True)
    if isinstance(tree, dict):
        return {k: _plain(v) for k, v in tree.items()}
    return tree
