"""Fused Triton kernels of tarp-fast, installed as ``tarp_fast.kernels``.

``run(call)`` runs one validated call (:class:`tarp_fast._contract.TarpCall`, built by
``tarp_fast.ops``); ``tarp_linear_triton`` takes the signature of
:func:`tarp_fast.reference.tarp_linear`. Same semantics (DESIGN.md §2), computed by fused Triton
kernels registered as ``torch.library`` ops
(see :mod:`._custom_ops` for the schemas, the autograd formulas and what is saved for backward,
:mod:`._launch` for the passes and the design decisions, :mod:`._kernels` for the kernels and
:mod:`._configs` for tile choices). It runs on CUDA tensors, or on CPU tensors under the Triton
interpreter (``TRITON_INTERPRET=1`` set before Python starts). ``tarp_fast.ops`` imports this
package lazily, only when the ``triton`` backend is asked for.

:mod:`.precompile` records the specializations a program would compile (no GPU needed) and
compiles them in parallel into Triton's cache; ``TARP_FAST_DX=fused|concat`` selects the design of
the backward's dx pass (:func:`._configs.dx_design`).

Task indices are not range-checked on CUDA (that needs a host sync); a row with an index
outside ``[0, T)`` is treated like a row that ``hard_skip`` drops (no base product, no delta:
its output is ``gate * act(0) + skip_gate * x + residual``). On CPU (the interpreter) the check
is free and is done.
"""

if __name__ != "tarp_fast.kernels":
    # This folder sits at the top of the checkout. With the checkout root on sys.path (`python -m`
    # run from it) it is importable as a top-level package named "kernels": the name of Hugging
    # Face's `kernels` package, which transformers probes by importing it. Look like a namespace
    # package shadowing nothing (no __file__, no version) so that probe reports "not installed"
    # instead of failing on our relative imports.
    globals().pop("__file__", None)
    __all__ = []
else:
    from ._api import *  # noqa: F403
    from ._api import __all__  # noqa: F401
