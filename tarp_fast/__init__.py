"""tarp-fast: fused kernels and modules for Meta-Learning the Difference (MLtD, TACL 2022).

Public surface (DESIGN.md §4): :func:`tarp_linear`, :class:`TARPLinear`, :func:`patch_model`,
:func:`unpatch_model`, :func:`merge_and_unload`, :func:`tarp_parameters`, :func:`mark_only_tarp_trainable`,
:func:`save_adapter`, :func:`load_adapter`, :func:`tarp_context`; TARP as a PEFT method in
:mod:`tarp_fast.peft` (``TarpConfig``) and :func:`export_lora`.

Importing needs neither a GPU, nor Triton, nor the compiled extension, nor PEFT (importing
:mod:`tarp_fast.peft` here only arranges that TARP registers with PEFT when PEFT is imported).
"""

__version__ = "0.1.0"  # the one version number: setup.py reads this line

from . import ops, peft, reference, tams
from ._ext import ext_info
from .adapter import load_adapter, save_adapter
from .nn import TARPLinear, tarp_context
from .ops import available_backends, tarp_linear
from .patch import mark_only_tarp_trainable, merge_and_unload, patch_model, tarp_parameters, unpatch_model
from .peft import export_lora

__all__ = [
    "__version__",
    "ops",
    "reference",
    "tams",
    "tarp_linear",
    "available_backends",
    "ext_info",
    "TARPLinear",
    "tarp_context",
    "patch_model",
    "unpatch_model",
    "merge_and_unload",
    "tarp_parameters",
    "mark_only_tarp_trainable",
    "save_adapter",
    "load_adapter",
    "peft",
    "export_lora",
]
