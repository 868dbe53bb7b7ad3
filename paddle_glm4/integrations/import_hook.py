"""The import hooks that `import paddle_glm4` installs: PaddleNLP's and PaddleFormers' Auto classes learn GLM-4
(paddlenlp.py, paddleformers.py, the adapters) as soon as the library's `transformers` module is imported,
whichever of the two packages comes first. Installing them imports neither library nor Paddle.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

# library -> (the module whose import makes its Auto classes exist, our adapter module, its register function)
LIBRARIES = {
    "PaddleNLP": ("paddlenlp.transformers", "paddle_glm4.integrations.paddlenlp", "register_paddlenlp"),
    "PaddleFormers": (
        "paddleformers.transformers",
        "paddle_glm4.integrations.paddleformers",
        "register_with_auto_classes",
    ),
}


def register_paddleformers() -> None:
    """Register GLM-4 with PaddleFormers' AutoConfig, AutoModel, AutoModelForCausalLM and AutoTokenizer
    (paddleformers.py). Imports PaddleFormers; calling it again does nothing. `import paddle_glm4` already does this
    when PaddleFormers gets imported, warning if it fails; this call raises instead, so it also shows why. Defined
    here, not in paddleformers.py, so that the name resolves where PaddleFormers is not installed."""
    from .paddleformers import register_with_auto_classes

    register_with_auto_classes()


def register_when_imported() -> None:
    """What `import paddle_glm4` runs, for each library: register now if it is imported already, else right after
    its `transformers` module is; when it is not installed, nothing (and it is never imported here)."""
    for library, (module, _, _) in LIBRARIES.items():
        if module in sys.modules:
            _register_or_warn(library)
        elif importlib.util.find_spec(module.partition(".")[0]) is not None and not any(
            isinstance(finder, _RegisterOnImport) and finder.library == library for finder in sys.meta_path
        ):
            sys.meta_path.insert(0, _RegisterOnImport(library))


def _register_or_warn(library: str) -> None:
    # a failure here must not break the library's import or `import paddle_glm4`; register_*() shows it
    _, adapter, register = LIBRARIES[library]
    partial = sys.modules.get(adapter)
    if partial is not None and not hasattr(partial, register):
        return  # the adapter's own import brought the library in; the adapter registers when it is complete
    try:
        getattr(importlib.import_module(adapter), register)()  # imports Paddle and the model: only now
    except Exception as err:  # noqa: BLE001
        warnings.warn(f"paddle_glm4 could not register GLM-4 with {library}: {err!r}", RuntimeWarning, stacklevel=2)


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """An import hook that registers once the library's `transformers` module has been executed (its Auto classes
    exist only then), however its import comes about. It finds the module the normal way and wraps only the loader."""

    def __init__(self, library: str):
        self.library, self.module = library, LIBRARIES[library][0]
        self._finding = False

    def find_spec(self, fullname, path, target=None):
        if fullname != self.module or self._finding:
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
        _register_or_warn(self._finder.library)
