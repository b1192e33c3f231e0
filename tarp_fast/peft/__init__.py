"""TARP as a Hugging Face PEFT method (PEFT stays optional: importing this package imports no PEFT).

An existing PEFT script switches to TARP by changing its config line::

    from peft import get_peft_model, PeftModel
    from tarp_fast.peft import TarpConfig           # imports PEFT, registers TARP with it

    model = get_peft_model(base, TarpConfig(r=8, variant="dynamic", task_type="CAUSAL_LM"))
    ...                                             # train, Trainer checkpoints, save_pretrained
    model = PeftModel.from_pretrained(base, "out")  # outputs bitwise equal
    model(**batch, adapter_names=["math", "code", "__base__"])   # mixed-adapter batch, training too

What lives where:

* :class:`TarpConfig`, :class:`TarpModel` (the tuner, a PEFT ``BaseTuner``), :class:`TarpLayer`
  (a ``BaseTunerLayer`` around ``nn.Linear`` / GPT-2 ``Conv1D``; computes with
  :func:`tarp_fast.ops.tarp_linear`), :func:`register`, :func:`set_backend`: in ``_tuner``,
  imported on first use of one of these names.
* :func:`export_lora`: a bilinear TARP adapter as a PEFT LoRA adapter (``_export``).
* Registration. ``import tarp_fast`` installs a one-shot import hook (:func:`_install_hook`): when
  PEFT is imported later (by the user, by transformers' ``from_pretrained`` of a folder that holds
  an adapter, by ``Trainer``), TARP is registered right after PEFT's own initialization, so a TARP
  ``adapter_config.json`` in a model folder loads like a LoRA one. Without ``import tarp_fast``
  in the process PEFT cannot know TARP (``KeyError: 'TARP'``).

Adapters are the files of :mod:`tarp_fast.adapter` (format 3): ``PeftModel.save_pretrained`` and
:func:`tarp_fast.save_adapter` write the same files, and each reads the other's.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
import threading
import warnings

__all__ = ["TarpConfig", "TarpModel", "TarpLayer", "register", "set_backend", "export_lora", "BASE_ADAPTER",
           "PEFT_TYPE"]

_TUNER_NAMES = {"TarpConfig", "TarpModel", "TarpLayer", "register", "set_backend", "BASE_ADAPTER", "PEFT_TYPE",
                "TarpPeftType"}
_TUNER = "tarp_fast.peft._tuner"


def __getattr__(name: str):
    if name in _TUNER_NAMES:
        return getattr(importlib.import_module(_TUNER), name)
    raise AttributeError(f"module 'tarp_fast.peft' has no attribute {name!r}")


def export_lora(model_or_dir, out_dir, **kw):
    """Write a bilinear TARP adapter as a PEFT LoRA adapter; see :func:`tarp_fast.peft._export.export_lora`."""
    from ._export import export_lora as _impl  # noqa: PLC0415

    return _impl(model_or_dir, out_dir, **kw)


# ---- registration when PEFT gets imported ----------------------------------------------------------
def _register_after_peft_import() -> None:
    """Import the tuner module (which registers TARP on import); never break ``import peft``."""
    if _TUNER in sys.modules:  # being imported (it registers at its end) or done
        return
    try:
        importlib.import_module(_TUNER)
    except Exception as exc:  # a PEFT release that changed what registration needs
        warnings.warn(f"tarp_fast: could not register TARP with PEFT ({type(exc).__name__}: {exc}); "
                      "TARP adapters will not load through PEFT. Call tarp_fast.peft.register() for the full error",
                      RuntimeWarning, stacklevel=2)


class _LoaderProxy:
    """PEFT's own loader, whose ``exec_module`` registers TARP once PEFT has initialized."""

    def __init__(self, loader) -> None:
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        _uninstall_hook()
        _register_after_peft_import()

    def __getattr__(self, name):  # get_resource_reader, is_package, get_code, ...
        return getattr(self._loader, name)


class _PeftImportHook(importlib.abc.MetaPathFinder):
    """One-shot: wraps the loader of the top-level ``peft`` package (the other finders find it)."""

    _busy = threading.local()

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "peft" or getattr(self._busy, "on", False):
            return None
        self._busy.on = True
        try:
            for finder in list(sys.meta_path):
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
            else:
                return None
        finally:
            self._busy.on = False
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _LoaderProxy(spec.loader)
        return spec


_HOOK = _PeftImportHook()


def _install_hook() -> None:
    """Register TARP now if PEFT is imported already, else when it is (called by ``import tarp_fast``)."""
    if "peft" in sys.modules:
        _register_after_peft_import()
    elif _HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _HOOK)


def _uninstall_hook() -> None:
    try:
        sys.meta_path.remove(_HOOK)
    except ValueError:
        pass


_install_hook()
