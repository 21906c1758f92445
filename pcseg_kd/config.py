"""YAML configs with ``_base_`` inheritance, dotted overrides and validation.

* ``_base_: other.yaml`` (or a list) merges the named files first, paths relative
  to the including file; later files and the command line win.
* A mapping with ``_delete_: true`` replaces what the bases had there instead of
  merging into it (mmengine's convention), e.g. to switch a distiller's ``type``.
* ``key.sub=value`` overrides are parsed by OmegaConf (YAML scalars, lists).
* ``validate(cfg, schema)`` checks every key against a dataclass schema and every
  ``{type: ...}`` section against the signature of the registered callable, so an
  unknown key or a wrong type fails before any work starts, naming the key path
  and the file (or "command line") that set it.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import os
import typing
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf

from .registry import Registry

BASE_KEY = "_base_"
DELETE_KEY = "_delete_"
CLI = "command line"


class ConfigError(ValueError):
    """A config problem, with the key path and the file that set it."""


# ----------------------------------------------------------------------------- loading
class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 floats: ``1e-3`` and ``2E5`` are numbers, not the
    strings YAML 1.1 makes of them (which only ``1.0e-3`` escapes)."""


_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_FLOAT_12 = __import__("re").compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", __import__("re").X)
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+0123456789."))


def _construct_mapping_unique(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    # PyYAML keeps the last of two equal keys without a word: a setting written twice in one
    # mapping (an edit that forgot the first) would silently take whichever came last
    seen: Dict[Any, Any] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            first = seen.setdefault(key, key_node)
        except TypeError:  # an unhashable key: PyYAML's own error says so
            continue
        if first is not key_node:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} in one mapping (first on line {first.start_mark.line + 1}; "
                            "YAML would silently keep the last value)", key_node.start_mark)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_Loader.construct_mapping = _construct_mapping_unique  # type: ignore[assignment]


def yaml_load(stream: Any) -> Any:
    """``yaml.safe_load`` with ``1e-3`` read as a float and a key given twice in one mapping an error."""
    return yaml.load(stream, Loader=_Loader)


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a text config (not UTF-8: byte {e.object[e.start]:#04x} at offset "
                          f"{e.start}); is this a binary file?") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config: {e.strerror or e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _merge(dst: dict, src: Mapping, src_name: str, prov: Dict[str, str], prefix: str = "") -> dict:
    """Recursive dict merge of ``src`` into ``dst``; records which file set each leaf."""
    for key, value in src.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            value = dict(value)
            replace = bool(value.pop(DELETE_KEY, False))
            if replace or not isinstance(dst.get(key), dict):
                for p in [p for p in prov if p == path or p.startswith(path + ".")]:
                    del prov[p]
                # the marker stays in the merged tree, so that a file's replacement still
                # replaces when that file is itself a later entry of some _base_ list
                dst[key] = {DELETE_KEY: True} if replace else {}
                prov[path] = src_name
            _merge(dst[key], value, src_name, prov, path + ".")
        else:
            for p in [p for p in prov if p.startswith(path + ".")]:
                del prov[p]
            dst[key] = value
            prov[path] = src_name
    return dst


def _load_tree(path: Path, prov: Dict[str, str], stack: Tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in stack:
        raise ConfigError(f"{path}: circular _base_ chain: {' -> '.join(map(str, stack + (path,)))}")
    data = _read_yaml(path)
    bases = data.pop(BASE_KEY, [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: _base_ must be a path or a list of paths, got {bases!r}")
    merged: dict = {}
    for base in bases:
        base_path = (path.parent / base)
        if not base_path.is_file():
            raise ConfigError(f"{path}: _base_ file {base!r} not found (looked at {base_path})")
        base_prov: Dict[str, str] = {}
        base_tree = _load_tree(base_path, base_prov, stack + (path,))
        _merge(merged, base_tree, "", {})
        prov.update(base_prov)
    _merge(merged, data, str(path), prov)
    return merged


def _strip_markers(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _strip_markers(v) for k, v in tree.items() if k != DELETE_KEY}
    return tree


def parse_overrides(overrides: Iterable[str]) -> dict:
    overrides = list(overrides)
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"{CLI}: override {item!r} is not of the form key.sub=value")
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(overrides))
    except Exception as e:  # OmegaConf's grammar errors
        raise ConfigError(f"{CLI}: cannot parse overrides {overrides}: {e}") from None


def load_config_with_provenance(path: os.PathLike | str, overrides: Sequence[str] = (),
                                schema: Optional[type] = None) -> Tuple[DictConfig, Dict[str, str]]:
    """Load ``path`` with its bases and ``overrides``; validate against ``schema`` if given.
    Also returns, for every key path, the file (or "command line") that set it."""
    prov: Dict[str, str] = {}
    tree = _load_tree(Path(path), prov)
    _merge(tree, parse_overrides(overrides), CLI, prov)
    tree = _strip_markers(tree)
    if schema is not None:
        tree = validate(tree, schema, prov)
    return OmegaConf.create(tree), prov


def load_config(path: os.PathLike | str, overrides: Sequence[str] = (),
                schema: Optional[type] = None) -> DictConfig:
    """:func:`load_config_with_provenance` without the provenance."""
    return load_config_with_provenance(path, overrides, schema)[0]


def save_config(cfg: DictConfig | Mapping, path: os.PathLike | str) -> None:
    """Write the resolved config atomically (temp file + rename)."""
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, (DictConfig, ListConfig)) else cfg
    atomic_write_text(path, yaml.safe_dump(container, sort_keys=False))


def atomic_write_text(path: os.PathLike | str, text: str) -> None:
    from .utils.io import atomic_write
    atomic_write(path, lambda f: f.write(text))


# ----------------------------------------------------------------------------- validation
def registry_field(registry: Registry, default: Any = dataclasses.MISSING,
                   engine_keys: Optional[Mapping[str, Any]] = None, **kw):
    """A schema field holding ``{type: ..., **kwargs}`` for ``registry``.

    ``engine_keys``: {key: type} the engine reads from the section and removes before it
    builds the object (e.g. a distiller's ``teacher_source``); type-checked, not passed on."""
    meta = {"registry": registry, "engine_keys": dict(engine_keys or {})}
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata=meta, **kw)
    if default is None:
        return dataclasses.field(default=None, metadata=meta, **kw)
    return dataclasses.field(default_factory=lambda: dict(default), metadata=meta, **kw)


def _where(prov: Mapping[str, str], path: str) -> str:
    probe = path
    while probe:
        if probe in prov and prov[probe]:
            return prov[probe]
        probe = probe.rpartition(".")[0]
    return "config"


def _type_ok(value: Any, ann: Any) -> bool:
    if ann is Any or ann is inspect.Parameter.empty:
        return True
    origin = typing.get_origin(ann)
    args = typing.get_args(ann)
    if origin is typing.Union:
        return any(_type_ok(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if ann is type(None):
        return value is None
    if ann is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if ann is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple, Sequence, typing.Sequence) or ann in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(args) == len(value) and all(_type_ok(v, a) for v, a in zip(value, args))
        inner = args[0] if args else Any
        return all(_type_ok(v, inner) for v in value)
    if origin in (dict, Mapping, typing.Mapping) or ann in (dict,):
        return isinstance(value, Mapping)
    if isinstance(ann, type):
        return isinstance(value, ann)
    return True  # annotations we cannot check (forward refs, protocols)


def _type_name(ann: Any) -> str:
    if typing.get_origin(ann) is not None:  # Optional[List[str]] -> "Optional[List[str]]", not "Optional"
        return str(ann).replace("typing.", "").replace("NoneType", "None")
    return getattr(ann, "__name__", None) or str(ann).replace("typing.", "")


def _check_value(path: str, value: Any, ann: Any, prov, errors: List[str]) -> None:
    if not _type_ok(value, ann):
        hint = ""
        if isinstance(value, str) and _type_ok(1.0, ann):
            try:
                float(value)
                hint = f" (a quoted number is a string: write {float(value)!r} without quotes, e.g. 1.0e-3)"
            except ValueError:
                pass
        errors.append(f"{_where(prov, path)}: {path}: expected {_type_name(ann)}, got "
                      f"{type(value).__name__} {value!r}{hint}")


def accepted_params(target: Any):
    """Keyword parameters a registered callable accepts: for a class whose ``__init__``
    forwards ``**kwargs`` to its base, the base's parameters too (walking the MRO)."""
    params: Dict[str, inspect.Parameter] = {}
    hints: Dict[str, Any] = {}
    chain = [c for c in target.__mro__ if "__init__" in vars(c)] if inspect.isclass(target) else [target]
    takes_any = False
    for obj in chain:
        fn = obj.__init__ if inspect.isclass(obj) else obj
        if fn is object.__init__:
            break
        sig = inspect.signature(fn)
        try:
            hints = {**typing.get_type_hints(fn), **hints}
        except Exception:
            pass
        for n, p in sig.parameters.items():
            if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                params.setdefault(n, p)
        if not any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
            break
    else:
        takes_any = True
    return params, hints, takes_any


def _validate_registry_section(path: str, section: Any, registry: Registry, prov, errors,
                               engine_keys: Optional[Mapping[str, Any]] = None) -> None:
    if not isinstance(section, Mapping):
        errors.append(f"{_where(prov, path)}: {path}: expected a mapping with a 'type' key, got {section!r}")
        return
    kind = section.get("type")
    if kind is None:
        errors.append(f"{_where(prov, path)}: {path}: missing 'type' (one of: {', '.join(registry.keys())})")
        return
    if kind not in registry and registry.unavailable_reason(kind):
        errors.append(f"{_where(prov, path + '.type')}: {path}.type: {registry.unavailable_reason(kind)}")
        return
    if kind not in registry:
        errors.append(f"{_where(prov, path + '.type')}: {path}.type: unknown {registry.name} type "
                      f"{kind!r}; registered: {', '.join(registry.keys())}")
        return
    target = registry.get(kind)
    params, hints, takes_any = accepted_params(target)
    injected = set(getattr(target, "injected_args", ()))  # filled in by the caller, not by config
    for key, value in section.items():
        if key == "type":
            continue
        sub = f"{path}.{key}"
        if engine_keys and key in engine_keys:
            _check_value(sub, value, engine_keys[key], prov, errors)
            continue
        if key in injected:
            errors.append(f"{_where(prov, sub)}: {sub}: set by the engine from the data, not by the config")
            continue
        if key not in params:
            if not takes_any:
                accepted = ", ".join([n for n in params if n not in injected] + list(engine_keys or ()))
                errors.append(f"{_where(prov, sub)}: {sub}: unknown key for {registry.name} "
                              f"{kind!r} (accepted: {accepted})")
            continue
        _check_value(sub, value, hints.get(key, params[key].annotation), prov, errors)
    for name, p in params.items():
        if p.default is p.empty and name not in section and name not in injected:
            errors.append(f"{_where(prov, path)}: {path}.{name}: required by {registry.name} {kind!r} but not set")


def _validate_dataclass(path: str, data: Any, schema: type, prov, errors) -> dict:
    if not isinstance(data, Mapping):
        errors.append(f"{_where(prov, path)}: {path or '<root>'}: expected a mapping, got {data!r}")
        return {}
    fields = {f.name: f for f in dataclasses.fields(schema)}
    hints = typing.get_type_hints(schema)
    out = {}
    for key in data:
        if key not in fields:
            sub = f"{path}.{key}" if path else key
            errors.append(f"{_where(prov, sub)}: {sub}: unknown key (accepted: {', '.join(fields)})")
    for name, f in fields.items():
        sub = f"{path}.{name}" if path else name
        if name in data:
            value = data[name]
        elif f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            value = f.default_factory()  # type: ignore[misc]
        else:
            errors.append(f"{_where(prov, path)}: {sub}: required key not set")
            continue
        ann = hints.get(name, Any)
        if typing.get_origin(ann) is typing.Union:
            inner = [a for a in typing.get_args(ann) if a is not type(None)]
            if len(inner) == 1 and dataclasses.is_dataclass(inner[0]):
                if value is None:
                    out[name] = None
                    continue
                ann = inner[0]
        if "registry" in f.metadata:
            if value is not None:
                _validate_registry_section(sub, value, f.metadata["registry"], prov, errors,
                                           f.metadata.get("engine_keys"))
        elif dataclasses.is_dataclass(ann):
            value = _validate_dataclass(sub, value, ann, prov, errors)
        else:
            _check_value(sub, value, ann, prov, errors)
        out[name] = value
    return out


def _check_finite(path: str, value: Any, prov, errors: List[str]) -> None:
    """No setting of any task means anything as NaN or ±inf (YAML's ``.nan`` / ``.inf``): one
    walk over the whole tree, so that a new key is covered without a check of its own
    (``lr=.inf`` passes ``lr > 0`` and fails later as a non-finite loss)."""
    if isinstance(value, float) and not math.isfinite(value):
        errors.append(f"{_where(prov, path.split('[')[0])}: {path}: must be a finite number, got {value!r}")
    elif isinstance(value, Mapping):
        for k, v in value.items():
            _check_finite(f"{path}.{k}" if path else str(k), v, prov, errors)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_finite(f"{path}[{i}]", v, prov, errors)


def validate(tree: Mapping, schema: type, prov: Optional[Mapping[str, str]] = None) -> dict:
    """Check ``tree`` against a dataclass ``schema``; fill defaults; raise one ConfigError
    listing every problem (a NaN or infinite number anywhere is one)."""
    errors: List[str] = []
    out = _validate_dataclass("", tree, schema, prov or {}, errors)
    _check_finite("", out, prov or {}, errors)
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
    return out
