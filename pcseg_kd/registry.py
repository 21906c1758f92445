"""A small registry: name -> callable, and ``build({type: name, **kwargs})``.

One registry per kind of thing (models, distillers, tasks, datasets). Every task
(Gaussian, sklearn, MNIST, SemanticKITTI) builds its distiller from the same
``DISTILLERS`` registry, so a method written once serves all of them.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, Mapping, Optional


class MissingDependencyError(ImportError, ValueError):
    """A registered name whose implementation needs a package that is not installed (the
    message says which and how to install it). A ``ValueError`` too, so config checks and the
    command-line tools report it as one line."""


class Registry:
    def __init__(self, name: str):
        self.name = name
        self._modules: Dict[str, Callable] = {}
        self._unavailable: Dict[str, str] = {}

    def register_unavailable(self, name: str, reason: str) -> None:
        """Declare ``name`` as known but not usable here (e.g. its optional dependency failed
        to import): :meth:`get` and :meth:`build` raise :class:`MissingDependencyError` with
        ``reason`` instead of "unknown type"."""
        if name not in self._modules:
            self._unavailable[name] = reason

    def unavailable_reason(self, key: str) -> Optional[str]:
        return None if key in self._modules else self._unavailable.get(key)

    def __repr__(self) -> str:
        return f"Registry({self.name!r}, {sorted(self._modules)})"

    def __contains__(self, key: str) -> bool:
        return key in self._modules

    def keys(self):
        return sorted(self._modules)

    def register_module(self, name: Optional[str] = None, module: Optional[Callable] = None,
                        force: bool = False):
        """Register ``module`` under ``name`` (default: its ``__name__``).

        Usable as ``@REG.register_module()``, ``@REG.register_module("kd")`` or
        ``REG.register_module("kd", module=KD)``.
        """
        def _register(obj: Callable) -> Callable:
            key = name or obj.__name__
            if key in self._modules and not force and self._modules[key] is not obj:
                raise KeyError(f"{key!r} is already registered in {self.name} "
                               f"(by {self._modules[key]!r}); pass force=True to replace it")
            self._modules[key] = obj
            self._unavailable.pop(key, None)
            return obj

        if module is not None:
            return _register(module)
        return _register

    def get(self, key: str) -> Callable:
        if key not in self._modules and key in self._unavailable:
            raise MissingDependencyError(self._unavailable[key])
        if key not in self._modules:
            raise KeyError(f"unknown {self.name} type {key!r}; registered: {', '.join(self.keys())}")
        return self._modules[key]

    def build(self, cfg: Mapping[str, Any], **defaults: Any) -> Any:
        """Build ``cfg['type'](**rest, **defaults)``; keys in ``cfg`` win over ``defaults``."""
        if not isinstance(cfg, Mapping) or "type" not in cfg:
            raise TypeError(f"{self.name} config must be a mapping with a 'type' key, got {cfg!r}")
        kwargs = dict(defaults)
        kwargs.update({k: v for k, v in cfg.items() if k != "type"})
        obj = self.get(cfg["type"])
        return obj(**kwargs)

    def signature(self, key: str) -> inspect.Signature:
        return inspect.signature(self.get(key))


MODELS = Registry("model")
DISTILLERS = Registry("distiller")
TASKS = Registry("task")
DATASETS = Registry("dataset")
