"""The import hook that `import paddle_glm4` installs: PaddleNLP's Auto classes learn GLM-4 (paddlenlp.py, the
adapter) as soon as `paddlenlp.transformers` is imported, whichever of the two packages comes first. Installing it
imports neither PaddleNLP nor Paddle.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings


def register_paddlenlp_when_imported() -> None:
    """What `import paddle_glm4` runs: register now if PaddleNLP is imported already, else right after
    `paddlenlp.transformers` is; when PaddleNLP is not installed, nothing (and PaddleNLP is never imported here)."""
    if "paddlenlp.transformers" in sys.modules:
        _register_or_warn()
    elif (importlib.util.find_spec("paddlenlp") is not None
          and not any(isinstance(finder, _RegisterOnImport) for finder in sys.meta_path)):
        sys.meta_path.insert(0, _RegisterOnImport())


def _register_or_warn():
    # a failure here must not break `import paddlenlp` or `import paddle_glm4`; register_paddlenlp() shows it
    try:
        from .paddlenlp import register_paddlenlp  # imports Paddle and the model: only once PaddleNLP is there

        register_paddlenlp()
    except Exception as err:  # noqa: BLE001
        warnings.warn(f"paddle_glm4 could not register GLM-4 with PaddleNLP: {err!r}", RuntimeWarning, stacklevel=2)


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """An import hook that registers once `paddlenlp.transformers` has been executed (its Auto classes exist only
    then), however its import comes about. It finds the module the normal way and wraps only the loader."""

    def __init__(self):
        self._finding = False

    def find_spec(self, fullname, path, target=None):
        if fullname != "paddlenlp.transformers" or self._finding:
            return None
        self._finding = True  # the lookup below walks sys.meta_path again, past this finder
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._finding = False
        if spec is None or spec.loader is None:
            return None
        spec.loader = _RegisterAfterLoading(spec.loader, self)
        return spec


class _RegisterAfterLoading(importlib.abc.Loader):
    def __init__(self, loader, finder):
        self._loader, self._finder = loader, finder

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        module.__loader__ = module.__spec__.loader = self._loader  # the module keeps no trace of the hook
        self._loader.exec_module(module)
        if self._finder in sys.meta_path:
            sys.meta_path.remove(self._finder)
        _register_or_warn()
