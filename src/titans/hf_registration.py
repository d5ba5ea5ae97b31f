"""`import titans` registers `titans.hf` with transformers' Auto classes once transformers is imported, without
importing transformers (seconds) in programs that never use it, nor failing where it is not installed."""

from __future__ import annotations

import importlib
import importlib.abc
import sys
import warnings


def install() -> None:
    """Register now if transformers is imported already, else right after it is."""
    if "transformers" in sys.modules:
        _register()
    elif not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


def _register() -> None:
    try:
        importlib.import_module("titans.hf")
    except Exception as exc:  # an unsupported transformers must not break `import transformers`
        warnings.warn(f"titans: model type 'titans' not registered with transformers ({exc}); "
                      "pip install 'titans[hf]'", stacklevel=2)


class _Finder(importlib.abc.MetaPathFinder):
    """Finds transformers with the other finders and has its loader register titans.hf after it (a spec found only
    to probe whether transformers is installed is never executed, and registers nothing)."""

    def find_spec(self, name, path, target=None):
        if name != "transformers":
            return None
        for finder in sys.meta_path:
            find = None if finder is self else getattr(finder, "find_spec", None)
            spec = None if find is None else find(name, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _RegisterAfter(spec.loader)
                return spec
        return None


class _RegisterAfter(importlib.abc.Loader):
    """A loader that runs `loader`, then registers titans.hf (everything else is `loader`'s)."""

    def __init__(self, loader: importlib.abc.Loader):
        self.loader = loader

    def __getattr__(self, name: str):
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, _Finder)]
        _register()
