"""TARP for PEFT: :class:`TarpConfig`, :class:`TarpModel` (``BaseTuner``), :class:`TarpLayer`
(``BaseTunerLayer``) and :func:`register`. Importing this module imports PEFT and registers TARP.

Design (see also the package docstring):

* **Layer.** :class:`TarpLayer` wraps the targeted ``nn.Linear`` / GPT-2 ``Conv1D`` as
  ``base_layer`` (PEFT's convention: base keys become ``<module>.base_layer.weight``) and holds
  every adapter's factors in ``ParameterDict``\\ s named like :class:`~tarp_fast.TARPLinear`'s
  parameters (``tarp_U``, ``tarp_V``, ``tarp_G``, ``tarp_H``, ``tarp_KU``, ``tarp_KV``, ``tarp_P``,
  ``tarp_Q``), keyed by adapter name. PEFT's saved key of ``<module>.tarp_U.<adapter>`` is
  ``base_model.model.<module>.tarp_U``: the tensor name :func:`tarp_fast.save_adapter` writes for
  the same layer, so both paths write one format. It computes through
  :func:`tarp_fast.ops.tarp_linear` (``layer.backend``, default ``"auto"``: Triton on CUDA, the
  native extension on CPU where faster, else the reference), with the base weight read in
  ``nn.Linear`` layout (a transposed view for ``Conv1D``, never a copy).
* **Mixed-adapter batches** (``adapter_names=[...]``, one name per sequence, ``"__base__"`` for
  none), in training as in inference: each layer stacks the factors of the adapters in the batch
  (ranks zero-padded to the largest) plus a zero-delta slot for ``"__base__"`` rows and calls
  ``tarp_linear``'s multi-task form once with a per-row ``task_index``; autograd routes each
  row's gradient to its own adapter's factors. A zero slot is exact: ``U = 0`` adds nothing and
  ``P = Q = 0`` scales by ``softplus(log(e - 1)) = 1``. Adapters that cannot share one call
  (``kronecker``, dynamic mixed with bilinear, different multiplicative offsets) run one call per
  adapter on their rows. Beam search / ``num_return_sequences`` expand the batch inside
  ``generate``; a layer that sees ``k`` times as many sequences as names repeats each name ``k``
  times (``repeat_interleave``, the way ``generate`` expands inputs), so the encoder of an
  encoder-decoder model keeps the unexpanded names. Activation checkpointing replays the routing
  of the forward it recomputes (:func:`tarp_fast.nn.context.replay_routing`).
* **Files.** ``TarpConfig.save_pretrained`` (called by ``PeftModel.save_pretrained`` right after
  PEFT wrote ``adapter_model.safetensors``) re-commits that file with tarp-fast's record (per-tensor
  sha256, embedded config, commit protocol: :func:`tarp_fast.adapter.write_adapter`).
  ``TarpConfig.from_pretrained`` runs every file check of :func:`tarp_fast.load_adapter` and keeps
  the validated tensors, which :meth:`TarpModel._remap_adapter_state_dict_for_load` loads in
  place of what PEFT read; :meth:`TarpModel.inject_adapter` checks the recorded model type and
  layers against the model before anything is injected.
"""

from __future__ import annotations

import contextlib
import enum
import os
import weakref
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_adapters_to_merge

from .. import adapter as _adapter
from .. import ops
from .._contract import DEFAULT_SCALE_OFFSET
from ..nn import context as _context
from ..nn.linear import (
    KRONECKER_FACTORS,
    _check_config,
    _is_conv1d,
    expand_task_index,
    init_factor_,
    static_effective_weight,
    tarp_factor_shapes,
)
from ..patch import _target_predicate

__all__ = ["TarpConfig", "TarpModel", "TarpLayer", "register", "set_backend", "BASE_ADAPTER", "PEFT_TYPE",
           "TarpPeftType"]

#: the name that selects the base model (no delta) in ``adapter_names``, as in PEFT
BASE_ADAPTER = "__base__"
_FACTORS = ("tarp_U", "tarp_V", "tarp_G", *KRONECKER_FACTORS, "tarp_P", "tarp_Q")
_RECORD_FIELDS = ("format", "format_version", "tarp_fast_version", "model", "layers", "tensors", "extra",
                  "safetensors_sha256")


class TarpPeftType(str, enum.Enum):
    """``peft_type`` of TARP. A ``str`` enum like PEFT's own ``PeftType``: equal (and hashing equal)
    to ``"TARP"``, with the ``.value`` / ``.name`` that PEFT and transformers read."""

    TARP = "TARP"


PEFT_TYPE = TarpPeftType.TARP
_DYNAMIC_MERGE = ("adapter {name!r} uses variant='dynamic': its delta U·S(x)·V·x depends on each input x "
                  "(S(x) = reshape(G·x, (r, r)) is computed per token), so no fixed weight equals it and it cannot be "
                  "merged. Use variant='bilinear' or 'kronecker' for mergeable adapters, or unload() to remove the "
                  "adapter without merging")


# ---- config ----------------------------------------------------------------------------------------
@dataclass
class TarpConfig(PeftConfig):
    """Configuration of a TARP adapter (PEFT method ``"TARP"``).

    Args:
        r: rank of ``U``/``V`` (``S(x)`` is ``r × r``), or of each Kronecker block ``U_i V_i``
            (``kronecker``: ``ΔW = Σ_{i=1..4} H_i ⊗ (U_i V_i)``; every targeted layer's in and out
            features must be multiples of 4).
        variant: ``"dynamic"`` (``U S(x) V x``), ``"bilinear"`` (``U V x``, LoRA-shaped, mergeable,
            exportable with :func:`tarp_fast.peft.export_lora`) or ``"kronecker"`` (mergeable).
        scale_weight: add the multiplicative term ``W ⊙ softplus(P Q + offset)``.
        scale_rank: rank of ``P``/``Q`` (default ``r``).
        scaling: multiplies the additive delta.
        init: ``"zero_delta"`` (the adapter starts as the base model) or ``"paper"``.
        target_modules: ``"auto"`` (the targets of :func:`tarp_fast.patch_model` for the model
            type), a list of module names (a module matches when its name equals an entry or ends
            with ``"." + entry``), or a regex string (PEFT's rule).
        exclude_modules, modules_to_save: as in PEFT.

    The fields from ``format`` to ``safetensors_sha256`` are tarp-fast's record of a saved
    adapter (module docstring of :mod:`tarp_fast.adapter`): filled when read from a folder, None
    for a new adapter. With ``layers`` set (a loaded adapter), injection builds exactly those
    layers with their saved settings.
    """

    r: int = field(default=8, metadata={"help": "rank of U/V (or of each Kronecker block U_i V_i)"})
    variant: str = field(default="dynamic", metadata={"help": "dynamic | bilinear | kronecker"})
    scale_weight: bool = field(default=False, metadata={"help": "add the multiplicative term softplus(PQ+offset)"})
    scale_rank: Optional[int] = field(default=None, metadata={"help": "rank of P/Q (default r)"})
    scaling: float = field(default=1.0, metadata={"help": "multiplies the additive delta"})
    init: str = field(default="zero_delta", metadata={"help": "zero_delta | paper"})
    target_modules: Optional[Union[list[str], str]] = field(
        default="auto", metadata={"help": "'auto' (patch_model's targets), module names, or a regex"})
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "as in PEFT"})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "as in PEFT"})
    # tarp-fast's record of a saved adapter (tarp_fast.adapter, format 3)
    format: Optional[str] = field(default=None, metadata={"help": "tarp-fast record (saved adapters only)"})
    format_version: Optional[int] = field(default=None, metadata={"help": "tarp-fast record"})
    tarp_fast_version: Optional[str] = field(default=None, metadata={"help": "tarp-fast record"})
    model: Optional[dict] = field(default=None, metadata={"help": "tarp-fast record: model type and class"})
    layers: Optional[dict] = field(default=None, metadata={"help": "tarp-fast record: layer settings"})
    tensors: Optional[dict] = field(default=None, metadata={"help": "tarp-fast record: tensor listing"})
    extra: Optional[dict] = field(default=None, metadata={"help": "tarp-fast record: free-form"})
    safetensors_sha256: Optional[str] = field(default=None, metadata={"help": "tarp-fast record: file hash"})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        _check_settings("TarpConfig", self.r, self.variant, self.scale_rank, self.scaling, self.init)
        if not isinstance(self.scale_weight, bool):
            raise ValueError(f"TarpConfig: argument 'scale_weight' must be True or False, got {self.scale_weight!r}")
        tm = self.target_modules
        if isinstance(tm, (tuple, set, frozenset)):
            self.target_modules = tm = sorted(tm)
        if not (isinstance(tm, str) and tm) and not (isinstance(tm, list) and tm and all(isinstance(t, str) for t in tm)):
            raise ValueError(f"TarpConfig: argument 'target_modules' must be 'auto', a non-empty list of module names "
                             f"or a regex string, got {tm!r}")

    # -- files ------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """Commit the adapter PEFT just wrote beside this config in tarp-fast's format.

        ``PeftModel.save_pretrained`` writes ``adapter_model.safetensors`` first and then calls
        this: the tensors it wrote are re-written with the embedded config and hashes and
        committed (:func:`tarp_fast.adapter.write_adapter`), so ``tarp_fast.load_adapter`` and
        ``PeftModel.from_pretrained`` read the result alike. A config saved on its own (no model
        attached, or no tensor file) is written as PEFT writes configs. Raises ``ValueError`` when
        the folder holds a PEFT adapter of another method (PEFT has already replaced its tensor
        file by then: that adapter cannot be recovered from this folder).
        """
        auto_mapping = kwargs.pop("auto_mapping_dict", None)
        owner = self.__dict__.get("_tarp_owner")
        tuner = owner() if owner is not None else None
        weights = os.path.join(save_directory, _adapter.ADAPTER_WEIGHTS)
        if tuner is not None and not os.path.isfile(weights) and os.path.isfile(
                os.path.join(save_directory, "adapter_model.bin")):
            raise ValueError(f"TarpConfig.save_pretrained: {save_directory}: TARP adapters are saved as safetensors only "
                             "(tarp-fast never reads pickles); PeftModel.save_pretrained(..., safe_serialization=False) "
                             "wrote adapter_model.bin: save again with safe_serialization=True")
        if tuner is None or not os.path.isfile(weights):
            return super().save_pretrained(save_directory, auto_mapping_dict=auto_mapping, **kwargs)
        adapter_name = tuner._adapter_name_of(self)
        from safetensors.torch import load as _load  # noqa: PLC0415

        with open(weights, "rb") as fh:
            tensors = _load(fh.read())
        header = self.to_dict()
        for key in _RECORD_FIELDS:
            header.pop(key, None)
        header["peft_type"] = PEFT_TYPE.value
        if header.get("task_type") is not None:
            header["task_type"] = str(getattr(header["task_type"], "value", header["task_type"]))
        for key, value in list(header.items()):
            if isinstance(value, (set, frozenset, tuple)):
                header[key] = sorted(value)
        if auto_mapping is not None:
            header["auto_mapping"] = auto_mapping
        _adapter.write_adapter(save_directory, tensors, layers=tuner._layer_configs(adapter_name),
                               model=_adapter._model_identity(tuner.model), extra={}, header=header,
                               func="TarpConfig.save_pretrained")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs):
        """Read a TARP adapter folder with every file check of :func:`tarp_fast.load_adapter`.

        Raises ``ValueError`` naming the file and field (a PEFT adapter of another method names
        ``peft_type``; a tarp-fast format-1/2 folder says how to convert it). The validated tensors
        ride on the returned config and are what ``PeftModel.from_pretrained`` / ``load_adapter``
        load. A config-only folder (``TarpConfig.save_pretrained`` without a model) reads as
        PEFT reads configs.
        """
        path = os.path.join(pretrained_model_name_or_path, subfolder) if subfolder else pretrained_model_name_or_path
        hub_kwargs, class_kwargs, _ = cls._split_kwargs(kwargs)
        if not os.path.isdir(path):
            path = _download(pretrained_model_name_or_path, subfolder, hub_kwargs)
        existing = _adapter._existing_config(path)
        if (existing is not None and existing.get("peft_type") == PEFT_TYPE.value and "format" not in existing
                and not os.path.exists(os.path.join(path, _adapter.ADAPTER_WEIGHTS))):
            return super().from_pretrained(path, **class_kwargs)
        read = _adapter.read_adapter(path, "TarpConfig.from_pretrained")
        if read.version < 3:
            raise ValueError(
                f"TarpConfig.from_pretrained: {read.config_path}: field 'format_version' is {read.version}: a tarp-fast "
                f"adapter of the format before PEFT ({_adapter.LEGACY_ADAPTER_WEIGHTS}). Load it with "
                "tarp_fast.load_adapter(model, folder) (it still reads) and save it again with tarp_fast.save_adapter "
                "to use it with PEFT"
            )
        config = cls.from_peft_type(**{**class_kwargs, **read.config})
        config.__dict__["_tarp_tensors"] = {_adapter.TENSOR_PREFIX + k: v for k, v in read.tensors.items()}
        config.__dict__["_tarp_source"] = read.config_path
        return config


def _download(repo_id: str, subfolder: Optional[str], hub_kwargs: dict) -> str:
    """The local folder of a Hub adapter (both files fetched into one snapshot folder)."""
    from huggingface_hub import hf_hub_download  # noqa: PLC0415

    try:
        config_file = hf_hub_download(repo_id, _adapter.ADAPTER_CONFIG, subfolder=subfolder, **hub_kwargs)
        hf_hub_download(repo_id, _adapter.ADAPTER_WEIGHTS, subfolder=subfolder, **hub_kwargs)
    except Exception as exc:
        raise ValueError(f"TarpConfig.from_pretrained: can't find a TARP adapter at {repo_id!r} ({exc})") from exc
    return os.path.dirname(config_file)


def _check_settings(who: str, r, variant, scale_rank, scaling, init) -> None:
    """Clear errors that name the argument (rank 0, unknown variant, ...): TARPLinear's checks
    (``num_tasks`` is always 1 here), with the rank called ``'r'`` as in :class:`TarpConfig`."""
    _check_config(r, variant, scale_rank, scaling, 1, init, who=who, rank_arg="'r' (the rank)")


# ---- mixed-adapter routing -------------------------------------------------------------------------
@dataclass(eq=False)
class _Routing:
    """``adapter_names`` of one call: ``slots`` (distinct names, first appearance first) and the
    slot of each sequence."""

    names: tuple
    slots: tuple
    seq_slot: torch.Tensor  # [B] int64 on CPU
    _rows: dict = field(default_factory=dict)  # (present, lead shape, device) -> (rows, rows per slot)

    def rows(self, present: tuple, shape: tuple, device: torch.device) -> tuple:
        """``(task_index [M], [row indices of slot 0, 1, ...])`` on ``device`` for an input of leading
        ``shape``: each row's slot among the adapters ``present`` in a layer (``len(present)``, the
        base, for the other names), sequences expanded as ``generate`` expands them.

        Built on the CPU and copied once per model call and layer kind: every layer of a model
        shares it, so a forward does not pay a host-device copy (a sync on CUDA) per layer.
        """
        key = (present, shape, device)
        if key not in self._rows:
            local = torch.tensor([present.index(n) if n in present else len(present) for n in self.slots])
            lead = shape[0] if len(shape) >= 1 else 1
            per_seq = expand_task_index(local[self.seq_slot], lead,
                                        argument="TarpLayer: argument 'adapter_names' has {b} names (one per sequence)")
            rows = per_seq.view(-1, *([1] * (len(shape) - 1))).expand(shape).reshape(-1)
            per_slot = [(rows == slot).nonzero().squeeze(1).to(device) for slot in range(len(present) + 1)]
            self._rows[key] = (rows.to(device), per_slot)
        return self._rows[key]


_ROUTING: list = []  # the active routing (innermost last); one model is driven by one thread


def _current_routing() -> Optional[_Routing]:
    return _ROUTING[-1] if _ROUTING else None


def _make_routing(adapter_names) -> _Routing:
    names = tuple(adapter_names)
    slots = tuple(dict.fromkeys(names))
    index = {n: i for i, n in enumerate(slots)}
    return _Routing(names, slots, torch.tensor([index[n] for n in names], dtype=torch.int64))


# ---- layer -----------------------------------------------------------------------------------------
class TarpLayer(nn.Module, BaseTunerLayer):
    """A PEFT tuner layer: ``base_layer`` (``nn.Linear`` or ``Conv1D``) plus named TARP adapters.

    ``forward`` computes ``tarp_linear(x, W, b, U, V, G, P, Q)`` of the active adapter (one at a
    time; a list of several active adapters is an error), the base layer when adapters are
    disabled, and mixed-adapter batches as the module docstring says. ``backend`` picks
    ``tarp_linear``'s backend.
    """

    adapter_layer_names = _FACTORS
    other_param_names = ("tarp_settings",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, settings: dict) -> None:
        super().__init__()
        self.base_layer = base_layer
        for name in _FACTORS:
            setattr(self, name, nn.ParameterDict())
        self.tarp_settings: dict[str, dict] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self._tarp_unmerged = None  # the base weight before the first merge (unmerge restores it bitwise)
        self._tarp_cache = None  # stacked factors of the last mixed batch (inference only)
        self.backend = "auto"
        self.conv1d = _is_conv1d(base_layer)
        self.in_features = base_layer.nx if self.conv1d else base_layer.in_features
        self.out_features = base_layer.nf if self.conv1d else base_layer.out_features
        self.update_layer(adapter_name, settings)

    # -- adapters ---------------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, settings: dict) -> None:
        """Add adapter ``adapter_name`` with ``settings`` (the keys of ``TARPLinear.tarp_config()``)."""
        settings = dict(settings)
        _check_settings(f"TarpLayer({adapter_name!r})", settings["rank"], settings["variant"],
                        settings["scale_rank"], settings["scaling"], settings["init"])
        weight = self.get_base_layer().weight
        for name, value in _init_factors(settings, weight.device, weight.dtype).items():
            getattr(self, name)[adapter_name] = nn.Parameter(value)
        self.tarp_settings[adapter_name] = settings
        self.set_adapter(self.active_adapters)

    def tarp_config(self, adapter_name: str) -> dict:
        """The saved settings of one adapter (those of :meth:`tarp_fast.TARPLinear.tarp_config`)."""
        return dict(self.tarp_settings[adapter_name])

    def _factors(self, adapter_name: str) -> dict:
        return {n: getattr(self, n)[adapter_name] for n in _FACTORS if adapter_name in getattr(self, n)}

    def _linear_weight(self) -> torch.Tensor:
        w = self.get_base_layer().weight
        return w.t() if self.conv1d else w

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        kwargs.pop("adapter_names", None)  # PEFT's hook argument: TARP routes through the tuner
        # the routing of this call, or under activation checkpointing that of the forward replayed
        routing = _context.replay_routing(self, _current_routing())
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        if routing is not None:
            return self._mixed(x, routing)
        active = [a for a in self.active_adapters if a in self.tarp_settings]
        if not active:
            return self.base_layer(x, *args, **kwargs)
        if len(active) > 1:
            raise ValueError(
                f"TarpLayer: {len(active)} adapters are active at once ({active}); a TARP layer runs one adapter per "
                "row. Activate one (set_adapter('name')), or pass adapter_names=[...] for a mixed-adapter batch"
            )
        return self._single(x, active[0])

    def _single(self, x: torch.Tensor, name: str) -> torch.Tensor:
        s, f = self.tarp_settings[name], self._factors(name)
        w, b = self._linear_weight(), self.get_base_layer().bias
        dtype = x.dtype
        x = self._cast_input_dtype(x, w.dtype)
        f = {k: v.to(w.dtype) for k, v in f.items()}
        if s["variant"] == "kronecker":
            y = ops.tarp_linear(x, _effective_weight(w, s, f), b, backend=self.backend)
        else:
            y = ops.tarp_linear(x, w, b, f["tarp_U"], f["tarp_V"], f.get("tarp_G"), f.get("tarp_P"), f.get("tarp_Q"),
                                scaling=s["scaling"], scale_offset=s["scale_offset"], backend=self.backend)
        return y.to(dtype)

    def _mixed(self, x: torch.Tensor, routing: _Routing) -> torch.Tensor:
        # this layer's adapters among the routed names; the rest (and "__base__") are the base slot
        present = tuple(n for n in routing.slots if n in self.tarp_settings)
        if not present:
            return self.base_layer(x)
        if len(present) == 1 and len(routing.slots) == 1:  # every sequence on one adapter
            return self._single(x, present[0])
        settings = [self.tarp_settings[n] for n in present]
        rows, per_slot = routing.rows(present, tuple(x.shape[:-1]), x.device)
        if not _stackable(settings):
            return self._mixed_loop(x, per_slot, present)
        w, b = self._linear_weight(), self.get_base_layer().bias
        dtype = x.dtype
        x = self._cast_input_dtype(x, w.dtype)
        U, V, G, P, Q, scaling, offset = self._stacked(present, settings, w)
        y = ops.tarp_linear(x, w, b, U, V, G, P, Q, scaling=scaling, scale_offset=offset, task_index=rows,
                            backend=self.backend)
        return y.to(dtype)

    def _stacked(self, present: list, settings: list, w: torch.Tensor) -> tuple:
        """Factors ``[T+1, ...]`` of the present adapters (ranks padded) and a zero slot last."""
        params = [p for n in present for p in self._factors(n).values()]
        key = (tuple(present), tuple((id(p), p._version) for p in params), w.dtype, w.device)
        if not torch.is_grad_enabled() and self._tarp_cache is not None and self._tarp_cache[0] == key:
            return self._tarp_cache[1]
        r = max(s["rank"] for s in settings)
        q = max(s["scale_rank"] for s in settings)
        dynamic = settings[0]["variant"] == "dynamic"
        scale = any(s["scale_weight"] for s in settings)
        same_scaling = len({s["scaling"] for s in settings}) == 1
        N, K = self.out_features, self.in_features
        kw = dict(device=w.device, dtype=w.dtype)
        Us, Vs, Gs, Ps, Qs = [], [], [], [], []
        for name, s in zip(present, settings):
            f = {k: v.to(w.dtype) for k, v in self._factors(name).items()}
            ri = s["rank"]
            U = F.pad(f["tarp_U"], (0, r - ri))
            Us.append(U if same_scaling else U * s["scaling"])
            Vs.append(F.pad(f["tarp_V"], (0, 0, 0, r - ri)))
            if dynamic:
                Gs.append(F.pad(f["tarp_G"].view(ri, ri, K), (0, 0, 0, r - ri, 0, r - ri)).reshape(r * r, K))
            if scale:
                if s["scale_weight"]:
                    qi = s["scale_rank"]
                    Ps.append(F.pad(f["tarp_P"], (0, q - qi)))
                    Qs.append(F.pad(f["tarp_Q"], (0, 0, 0, q - qi)))
                else:
                    Ps.append(torch.zeros(N, q, **kw))
                    Qs.append(torch.zeros(q, K, **kw))
        Us.append(torch.zeros(N, r, **kw))
        Vs.append(torch.zeros(r, K, **kw))
        if dynamic:
            Gs.append(torch.zeros(r * r, K, **kw))
        if scale:
            Ps.append(torch.zeros(N, q, **kw))
            Qs.append(torch.zeros(q, K, **kw))
        out = (torch.stack(Us), torch.stack(Vs), torch.stack(Gs) if dynamic else None,
               torch.stack(Ps) if scale else None, torch.stack(Qs) if scale else None,
               settings[0]["scaling"] if same_scaling else 1.0,
               next((s["scale_offset"] for s in settings if s["scale_weight"]), DEFAULT_SCALE_OFFSET))
        self._tarp_cache = (key, out) if not torch.is_grad_enabled() else None
        return out

    def _mixed_loop(self, x: torch.Tensor, per_slot: list, present: tuple) -> torch.Tensor:
        """One call per adapter on its rows (adapters that cannot share one ``tarp_linear`` call);
        ``per_slot``: the row indices of each adapter, then of the base."""
        flat = x.reshape(-1, x.shape[-1])
        out = None
        for slot, idx in enumerate(per_slot):
            if idx.numel() == 0:
                continue
            part = flat.index_select(0, idx)
            y = self._single(part, present[slot]) if slot < len(present) else self.base_layer(part)
            if out is None:
                out = y.new_zeros(flat.shape[0], y.shape[-1])
            out = out.index_copy(0, idx, y)
        return out.view(*x.shape[:-1], out.shape[-1])

    # -- merge ------------------------------------------------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Fold static adapters (``bilinear``, ``kronecker``) into the base weight; ``dynamic`` raises."""
        names = [n for n in check_adapters_to_merge(self, adapter_names) if n in self.tarp_settings]
        for name in names:
            if self.tarp_settings[name]["variant"] == "dynamic":
                raise ValueError("TarpLayer.merge: " + _DYNAMIC_MERGE.format(name=name))
        w = self._linear_weight()
        for name in names:
            with torch.no_grad():
                f = {k: v.to(w.dtype) for k, v in self._factors(name).items()}
                merged = _effective_weight(w.detach(), self.tarp_settings[name], f)
                if safe_merge and not bool(torch.isfinite(merged).all()):
                    raise ValueError(f"TarpLayer.merge: merging adapter {name!r} gives non-finite weights")
                if self._tarp_unmerged is None:
                    self._tarp_unmerged = w.detach().clone()
                w.copy_(merged)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Restore the base weight of before the first merge, bitwise."""
        if not self.merged:
            return
        with torch.no_grad():
            self._linear_weight().copy_(self._tarp_unmerged)
        self._tarp_unmerged = None
        self.merged_adapters = []

    def __repr__(self) -> str:
        return "tarp." + super().__repr__()

    def extra_repr(self) -> str:
        return ", ".join(f"{n}: rank={s['rank']}, variant={s['variant']!r}" for n, s in self.tarp_settings.items())


def _stackable(settings: list) -> bool:
    """Whether these adapters can share one multi-task ``tarp_linear`` call."""
    variants = {s["variant"] for s in settings}
    if variants not in ({"dynamic"}, {"bilinear"}):
        return False
    scaled = [s for s in settings if s["scale_weight"]]
    # rows without the multiplicative term (and "__base__" rows) get P = Q = 0: exact only at the
    # default offset, where softplus(offset) = 1
    return not scaled or all(s["scale_offset"] == DEFAULT_SCALE_OFFSET for s in scaled)


def _effective_weight(w: torch.Tensor, s: dict, f: dict) -> torch.Tensor:
    """``W ⊙ softplus(P Q + offset) + scaling · Δ`` for a static adapter (Δ = U V or Σ_i H_i ⊗ (U_i V_i))."""
    return static_effective_weight(w, f, variant=s["variant"], scaling=s["scaling"], scale_offset=s["scale_offset"],
                                   scale_weight=s["scale_weight"])


def _init_factors(s: dict, device, dtype) -> dict:
    """New factors as :meth:`tarp_fast.TARPLinear.reset_tarp_parameters` initializes them (the
    same shapes and rules: :func:`~tarp_fast.nn.linear.tarp_factor_shapes`, ``init_factor_``)."""
    # ValueError naming in/out_features when a kronecker layer's are not multiples of n
    shapes = tarp_factor_shapes(s["in_features"], s["out_features"], s["rank"], s["variant"], s["scale_weight"],
                                s["scale_rank"], who="TarpLayer")
    out = {}
    for name, shape in shapes.items():
        t = torch.empty(shape, device=device, dtype=dtype)
        if t.device.type != "meta":
            init_factor_(name, t, s["init"], in_features=s["in_features"], rank=s["rank"])
        out[name] = t
    return out


# ---- tuner -----------------------------------------------------------------------------------------
class TarpModel(BaseTuner):
    """The PEFT tuner of TARP: injects :class:`TarpLayer` into the targeted modules.

    Beyond ``BaseTuner``: ``"auto"`` targets, the model checks of a loaded adapter before
    injection, mixed-adapter batches (``adapter_names``) in training and generation, merge refused
    for ``dynamic`` adapters before anything is merged, and tarp-fast's file checks on load.
    """

    prefix: str = "tarp_"
    tuner_layer_cls = TarpLayer
    target_module_mapping: dict = {}

    def inject_adapter(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True,
                       low_cpu_mem_usage: bool = False, state_dict: Optional[dict] = None) -> None:
        config = self.peft_config[adapter_name]
        config.__dict__["_tarp_owner"] = weakref.ref(self)
        _check_loaded_adapter(model, config)  # before anything changes
        _resolve_targets(model, config)
        super().inject_adapter(model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                               low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key,
                            parameter_name=None) -> None:
        if parameter_name is not None:
            raise ValueError("TarpConfig: TARP targets modules; 'target_parameters' is not supported")
        base = target.get_base_layer() if isinstance(target, TarpLayer) else target
        if not (isinstance(base, nn.Linear) or _is_conv1d(base)):
            raise TypeError(f"TarpConfig: argument 'target_modules' matched {current_key!r}, a {type(base).__name__}; "
                            "TARP wraps nn.Linear and transformers Conv1D modules")
        settings = _layer_settings(peft_config, current_key, base)
        if isinstance(target, TarpLayer):
            target.update_layer(adapter_name, settings)
            return
        new = TarpLayer(base, adapter_name, settings)
        if adapter_name not in self.active_adapters:
            new.requires_grad_(False)
        self._replace_module(parent, target_name, new, target)

    def _adapter_name_of(self, config: PeftConfig) -> str:
        for name, c in self.peft_config.items():
            if c is config:
                return name
        raise ValueError("TarpConfig.save_pretrained: this config belongs to no adapter of its model")

    def _layer_configs(self, adapter_name: str) -> dict:
        return {n: m.tarp_config(adapter_name) for n, m in self.model.named_modules()
                if isinstance(m, TarpLayer) and adapter_name in m.tarp_settings}

    # -- mixed-adapter batches ---------------------------------------------------------------------
    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        routing = self._routing(adapter_names, args, kwargs)
        _ROUTING.append(routing)
        try:
            yield
        finally:
            _ROUTING.remove(routing)

    def _routing(self, adapter_names, args: tuple, kwargs: dict) -> _Routing:
        if (isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple))
                or not all(isinstance(n, str) for n in adapter_names) or not adapter_names):
            raise TypeError(f"argument 'adapter_names' must be a non-empty list of adapter names (str), one per "
                            f"sequence, got {adapter_names!r}")
        loaded = list(self.peft_config)
        unknown = sorted({n for n in adapter_names if n != BASE_ADAPTER and n not in self.peft_config})
        if unknown:
            raise ValueError(f"argument 'adapter_names' names adapter(s) {unknown} that are not loaded (loaded: "
                             f"{loaded}; {BASE_ADAPTER!r} selects the base model)")
        batch = _batch_size(args, kwargs)
        if batch is not None and batch != len(adapter_names):
            raise ValueError(f"argument 'adapter_names' has {len(adapter_names)} names, but the batch has {batch} "
                             "sequences (one name per sequence)")
        if any(m.merged for m in self.model.modules() if isinstance(m, TarpLayer)):
            raise ValueError("argument 'adapter_names' needs unmerged adapters: call unmerge_adapter() first")
        return _make_routing(adapter_names)

    # -- merge ------------------------------------------------------------------------------------
    def _check_mergeable(self, adapter_names: Optional[list]) -> None:
        names = adapter_names if adapter_names is not None else self.active_adapters
        for name in names:
            for m in self.model.modules():
                if isinstance(m, TarpLayer) and name in m.tarp_settings:
                    if m.tarp_settings[name]["variant"] == "dynamic":
                        raise ValueError("merge: " + _DYNAMIC_MERGE.format(name=name))
                    break

    def merge_adapter(self, adapter_names: Optional[list] = None, safe_merge: bool = False) -> None:
        self._check_mergeable(adapter_names)
        super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def _unload_and_optionally_merge(self, merge: bool = True, progressbar: bool = False, safe_merge: bool = False,
                                     adapter_names: Optional[list] = None):
        if merge:
            self._check_mergeable(adapter_names)
        return super()._unload_and_optionally_merge(merge=merge, progressbar=progressbar, safe_merge=safe_merge,
                                                    adapter_names=adapter_names)

    # -- loading -------------------------------------------------------------------------------------
    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Load the tensors ``TarpConfig.from_pretrained`` validated (not PEFT's second read of
        the file, which a save torn between commit and rename leaves stale), and refuse a state
        dict that misses adapter tensors (PEFT alone would only list them as missing)."""
        validated = config.__dict__.pop("_tarp_tensors", None)
        source = config.__dict__.get("_tarp_source", "the adapter")
        if validated is not None:
            mine = {k for k in state_dict if _is_tarp_key(k)}
            theirs = {k for k in validated if _is_tarp_key(k)}
            if mine != theirs:
                raise ValueError(f"load_adapter: {source}: the tensor file changed after its config was read "
                                 f"(only in the file: {sorted(mine - theirs)[:3]}, only in the config: "
                                 f"{sorted(theirs - mine)[:3]})")
            state_dict = {k: (validated[k] if k in theirs else v) for k, v in state_dict.items()}
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        expected = {n for n, _ in model.named_parameters()
                    if n.endswith(f".{adapter_name}") and _is_tarp_key(n.rsplit(".", 1)[0])}
        missing = sorted(expected - set(remapped))
        if missing:
            raise ValueError(f"load_adapter: {source}: adapter {adapter_name!r} lacks tensors the model's TARP layers "
                             f"have: {missing[:3]} (another model's adapter, or one saved with other target_modules)")
        return remapped


def _is_tarp_key(key: str) -> bool:
    return any(f".{n}" in f".{key}" for n in _FACTORS)


def _batch_size(args: tuple, kwargs: dict) -> Optional[int]:
    for key in ("input_ids", "inputs_embeds"):
        t = kwargs.get(key)
        if isinstance(t, torch.Tensor) and t.dim() >= 1:
            return t.shape[0]
    if args and isinstance(args[0], torch.Tensor) and args[0].dim() >= 1:
        return args[0].shape[0]
    return None


def _layer_settings(config: TarpConfig, key: str, base: nn.Module) -> dict:
    """A layer's settings: saved ones for a loaded adapter, else the config's."""
    recorded = (config.layers or {}).get(key)
    if recorded is not None:
        return {k: recorded[k] for k in ("in_features", "out_features", "bias", "rank", "variant", "scale_weight",
                                         "scale_rank", "scaling", "num_tasks", "init", "scale_offset")}
    conv = _is_conv1d(base)
    return {"in_features": base.nx if conv else base.in_features, "out_features": base.nf if conv else base.out_features,
            "bias": base.bias is not None, "rank": config.r, "variant": config.variant,
            "scale_weight": config.scale_weight,
            "scale_rank": config.scale_rank if config.scale_rank is not None else config.r,
            "scaling": float(config.scaling), "num_tasks": 1, "init": config.init,
            "scale_offset": 0.0 if config.init == "paper" else DEFAULT_SCALE_OFFSET}


def _unwrapped(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if isinstance(module, TarpLayer) else module


def _resolve_targets(model: nn.Module, config: TarpConfig) -> None:
    """``target_modules``: the saved layers of a loaded adapter, or ``"auto"`` as patch_model reads it."""
    if config.layers is not None:
        config.target_modules = sorted(config.layers)
        return
    if config.target_modules != "auto":
        return
    wanted = _target_predicate(model, "auto")
    names = []
    for name, module in model.named_modules():
        if not name or name.endswith(".base_layer") or ".modules_to_save." in f".{name}." or ".original_module" in name:
            continue
        base = _unwrapped(module)
        if (isinstance(module, TarpLayer) or (isinstance(base, nn.Linear) or _is_conv1d(base))) and wanted(name, base):
            names.append(name)
    if not names:
        raise ValueError(f"TarpConfig: argument 'target_modules'='auto' matched no nn.Linear/Conv1D module in "
                         f"{type(model).__name__}; pass the module names")
    config.target_modules = names


def _check_loaded_adapter(model: nn.Module, config: TarpConfig) -> None:
    """A loaded adapter must be this model's: model type, layers with the saved shapes, single-task.

    ``ValueError`` naming the file (or the config) and the field; nothing is changed. The model
    and module checks are :func:`tarp_fast.load_adapter`'s (a layer already wrapped by a
    :class:`TarpLayer` is checked by its base layer); the rest is what PEFT cannot load.
    """
    if config.layers is None:
        return
    where = _adapter._File("TarpModel.inject_adapter", config.__dict__.get("_tarp_source", "TarpConfig"))
    _adapter._check_model_identity(model, {"model": config.model}, where)
    extra = config.extra or {}
    if "tams" in extra:
        raise where.error("extra.tams", "holds TAMS modules, which load with tarp_fast.tams.load_tams, not with PEFT")
    for lname, cfg in config.layers.items():
        if cfg.get("num_tasks", 1) != 1:
            raise where.error(f"layers.{lname}.num_tasks", f"is {cfg['num_tasks']}: a multi-task adapter (integer "
                                                          "task ids) loads with tarp_fast.load_adapter; in PEFT use "
                                                          "one named adapter per task")
    _adapter._check_base_modules(model, config.layers, where, resolve=_unwrapped)


# ---- public helpers --------------------------------------------------------------------------------
def set_backend(model: nn.Module, backend: str) -> nn.Module:
    """Set ``tarp_linear``'s backend (``"auto" | "reference" | "triton" | "native"``) of every TARP
    layer of ``model`` (a ``PeftModel`` or anything holding :class:`TarpLayer` s). Returns ``model``."""
    if backend not in ops.BACKENDS:
        raise ValueError(f"set_backend: argument 'backend' must be one of {ops.BACKENDS}, got {backend!r}")
    for m in model.modules():
        if isinstance(m, TarpLayer):
            m.backend = backend
    return model


def register() -> None:
    """Make TARP a PEFT method: ``peft_type`` ``"TARP"`` → :class:`TarpConfig` / :class:`TarpModel`,
    parameter prefix ``"tarp_"``. Idempotent; runs when this module is imported.

    Why not ``peft.utils.register_peft_method`` (PEFT 0.15+): it refuses every name that is not a
    member of PEFT's own ``PeftType`` enum ("please add an entry to peft.utils.peft_types.PeftType"),
    so no method defined outside PEFT can use it. It fills three tables of ``peft.mapping`` keyed
    by the PEFT type (config class, tuner class, parameter prefix); this function fills the same
    three, under :data:`PEFT_TYPE` (a ``str`` enum member equal to ``"TARP"``, so a ``peft_type``
    read from JSON finds it). TARP is not registered for ``PeftMixedModel``.

    Raises ``RuntimeError`` with what to do when a PEFT release changes this: the tables moved or
    are no longer dicts, PEFT ships a method of its own named ``TARP``, or PEFT is older than 0.21
    (before it, saving and loading handle PEFT's own methods only).
    """
    import peft  # noqa: PLC0415
    from peft import mapping  # noqa: PLC0415
    from peft.utils.peft_types import PeftType  # noqa: PLC0415

    version = getattr(peft, "__version__", "?")

    def changed(reason: str) -> RuntimeError:
        return RuntimeError(f"tarp-fast cannot register TARP with this PEFT ({version}): {reason}. Use the PEFT "
                            "version pinned in requirements-dev.txt (PEFT >= 0.21), or update "
                            "tarp_fast.peft._tuner.register for this PEFT")

    for hook in ("_get_adapter_state_dict", "_remap_adapter_state_dict_for_load"):
        if hook not in vars(BaseTuner):  # PEFT < 0.21 saves and loads only its own PeftType members
            raise changed(f"peft.tuners.tuners_utils.BaseTuner.{hook} is missing (PEFT >= 0.21 lets the method's "
                          "tuner class select and rename its tensors)")
    tables = {}
    for name in ("PEFT_TYPE_TO_CONFIG_MAPPING", "PEFT_TYPE_TO_TUNER_MAPPING", "PEFT_TYPE_TO_PREFIX_MAPPING"):
        table = getattr(mapping, name, None)
        if not isinstance(table, dict):
            raise changed(f"peft.mapping.{name} is {type(table).__name__}, expected the dict register_peft_method fills")
        tables[name] = table
    if "TARP" in getattr(PeftType, "__members__", {}):
        raise changed("PEFT now has a method of its own named TARP (peft.utils.peft_types.PeftType.TARP)")
    wanted = {"PEFT_TYPE_TO_CONFIG_MAPPING": TarpConfig, "PEFT_TYPE_TO_TUNER_MAPPING": TarpModel,
              "PEFT_TYPE_TO_PREFIX_MAPPING": TarpModel.prefix}
    for name, value in wanted.items():
        current = tables[name].get(PEFT_TYPE)
        if current is not None and current != value and getattr(current, "__module__", None) != __name__:
            raise changed(f"peft.mapping.{name}['TARP'] is already {current!r}")
    if TarpModel.prefix in [v for k, v in tables["PEFT_TYPE_TO_PREFIX_MAPPING"].items() if k != PEFT_TYPE]:
        raise changed(f"another PEFT method uses the parameter prefix {TarpModel.prefix!r}")
    for name, value in wanted.items():
        tables[name][PEFT_TYPE] = value


register()
