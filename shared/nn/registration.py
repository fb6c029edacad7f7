"""Registration with Opacus, made when Opacus is imported: the layers' samplers put in
Opacus's registries, its own extension points, so that ``PrivacyEngine`` handles these
layers as it handles its own in both of its clipping modes.

The layers register when Opacus is imported, not when they are: Opacus is slow to import,
and processes that only hold a model's weights (the server, a simulation's driver beside
its busy workers) never train it privately. Opacus cannot be used before it is imported,
so nothing can reach it unregistered.
"""

from __future__ import annotations

import importlib.abc
import sys

from fedrnn.shared.nn.layers import GRU, LSTM, RNN, Embedding
from fedrnn.shared.nn.samplers import _recurrent_grad_sample, _recurrent_norm_sample


def _register_with_opacus() -> None:
    from opacus.grad_sample import register_grad_sampler, register_norm_sampler
    from opacus.grad_sample.embedding import compute_embedding_grad_sample

    register_grad_sampler(Embedding)(compute_embedding_grad_sample)
    register_grad_sampler([LSTM, GRU, RNN])(_recurrent_grad_sample)
    register_norm_sampler([LSTM, GRU, RNN])(_recurrent_norm_sample)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Calls ``then`` as soon as the package ``name`` has been imported.

    An import hook: Opacus may be imported before or after this package, by any of its
    modules, and also after an availability check has looked it up without importing it.
    """

    def __init__(self, name: str, then) -> None:
        self.name, self.then = name, then

    def find_spec(self, fullname: str, path, target=None):
        if fullname != self.name:
            return None
        for finder in sys.meta_path:  # the real finders locate the package
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
        else:
            return None
        # The hook stays until the package has actually run: a mere look-up (an
        # ``importlib.util.find_spec`` availability check) discards this spec.
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            execute = spec.loader.exec_module

            def exec_module(module) -> None:
                execute(module)
                if self in sys.meta_path:
                    sys.meta_path.remove(self)
                self.then()

            spec.loader.exec_module = exec_module  # this spec's own loader instance
        return spec


if "opacus" in sys.modules:
    _register_with_opacus()
else:
    sys.meta_path.insert(0, _AfterImport("opacus", _register_with_opacus))
