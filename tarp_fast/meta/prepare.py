"""The preparation stage (MLtD Algorithm 1): meta-learn a base and a TARP initialization.

Notation: ``θ`` the slow parameters (the base model, the TARP initialization ``φ``, the TAMS
controller and cells when present), ``φ'_t`` the fast parameters of task ``t`` (its copy of the
TARP factors and, with TAMS, of the searched cells' weights). One meta-step over a meta-batch
of ``T`` tasks, each with support batches ``S_t^1..S_t^k`` and a query batch ``Q_t``::

    φ'_t ← φ                                    (every task starts from the shared init)
    repeat k times:  φ'_t ← φ'_t − α · d_t        d_t = ∇_{φ'_t} L(S_t^j; θ, φ'_t)      (SGD)
                                                   or the Adam direction m̂ / (√v̂ + ε)   (Adam)
    meta-loss      = (1/T) Σ_t L(Q_t; θ, φ'_t)
    θ ← OuterAdam(θ, ∇_θ meta-loss)

Algorithms (``PrepConfig.algorithm``):

* ``"fomaml"`` (default): first-order MAML: ``∂φ'_t/∂φ ≈ I``, so ``∇_φ = (1/T) Σ_t ∇_{φ'_t} L(Q_t)``;
  the base gets its exact gradient at the adapted factors.
* ``"maml"``: exact second order: the inner updates stay in the autograd graph
  (``create_graph=True``), so the meta-gradient flows through every inner step. For small models.
* ``"reptile"``: ``φ`` moves toward the adapted factors: its outer "gradient" is
  ``(1/T) Σ_t (φ − φ'_t)``; the base still gets the query gradient at the adapted factors (the
  inner loop adapts only the fast parameters, so the base has no Reptile direction of its own).

``learn_inner_lr=True`` learns one inner learning rate per fast tensor (Meta-SGD style, stored
as ``log α``). Under ``fomaml``/``reptile`` its gradient is exact given the (detached) inner
directions: ``φ'_t = φ − α Σ_j d_t^j`` so ``∂L/∂α = −<∇_{φ'_t} L, Σ_j d_t^j>``.

**Batched tasks.** The ``T`` tasks are adapted together: the fast factors are stacked
``[T, ...]`` and passed through ``torch.func.functional_call``; the TARP layers are declared
``T``-task for the call and every sequence carries its task id through
:func:`tarp_fast.tarp_context` (and, with TAMS, through the active architecture, from which the
cells read it), so one forward/backward per inner step serves all tasks. The inner
loss is the *sum* over tasks of each task's mean loss, so each task's slice of the gradient is
exactly its own gradient. ``batched=False`` runs the reference Python loop over tasks.

**Distributed.** With ``torch.distributed`` initialized, rank ``r`` of ``W`` takes tasks
``r, r+W, ...`` of each meta-batch (every rank draws the same meta-batch from the same seed),
and the slow gradients are summed with one ``all_reduce`` over a flat buffer; the loss is
normalized by the global task count, so the update equals the one-process update. DDP's hooks
cannot serve here: the inner loop differentiates with ``torch.autograd.grad`` through
``functional_call`` and only the outer gradient is reduced.

**FSDP2** (``prepare(..., fsdp=True)``, for a model that does not fit one device): each
transformer block, then the root, is sharded with ``torch.distributed.fsdp.fully_shard``
(:func:`shard_for_preparation`). The fast parameters are left out of the sharding
(``ignored_params``): they are small, every rank holds them whole, and the inner loop replaces
them per task through ``functional_call``. FSDP all-gathers the sharded base around each block
and reduce-scatters its outer gradient (a sum, divide factor 1, as the loss is already
normalized by the global task count); the replicated parameters' gradients are all-reduced as
without FSDP, and gradient clipping takes the norm over both. Checkpoints hold full tensors
(gathered on every rank, written by rank 0) and load into a sharded or unsharded model alike.
Needs ``tasks_per_batch`` divisible by the world size (every rank runs the same collectives)
and a first-order algorithm (``fomaml`` or ``reptile``). With TAMS (decoder-only models) the
controller and the input embeddings stay whole as well: they run outside the model's forward.
:func:`gather_full_state_dict` collects the trained model for saving.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
import torch.nn as nn

from ..data.sampling import TaskBatch, TaskSampler, step_generator
from ..nn.context import tarp_context
from ..nn.linear import TARP_PARAM_PREFIX, TARPLinear
from ..tams.cell import CELL_NAME
from .checkpoint import (
    Checkpointer,
    CheckpointError,
    optimizer_state_from_flat,
    optimizer_state_to_flat,
    rng_state,
    set_rng_state,
)
from .finetune import NonFiniteLossError
from .models import sequence_losses

__all__ = ["PrepConfig", "MetaLearner", "prepare", "fast_parameter_names", "stacked_tasks", "ALGORITHMS",
           "RESUME_MAY_CHANGE", "shard_for_preparation", "transformer_blocks", "gather_full_state_dict"]

ALGORITHMS = ("fomaml", "maml", "reptile")
INNER_OPTIMIZERS = ("sgd", "adam")


@dataclass
class PrepConfig:
    """Settings of the preparation stage (see the module docstring)."""

    algorithm: str = "fomaml"
    meta_steps: int = 100
    tasks_per_batch: int = 4
    inner_steps: int = 1
    inner_lr: float = 3e-3
    inner_optimizer: str = "adam"
    learn_inner_lr: bool = False
    outer_lr: float = 1e-3
    batch_size: int = 16
    query_batch_size: int = 16
    seq_len: int = 96
    grad_clip: float = 1.0
    batched: bool = True
    seed: int = 0
    checkpoint_every: int = 0
    adam_betas: tuple = (0.9, 0.999)
    adam_eps: float = 1e-8
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"PrepConfig: argument 'algorithm' must be one of {ALGORITHMS}, got {self.algorithm!r}")
        if self.inner_optimizer not in INNER_OPTIMIZERS:
            raise ValueError(f"PrepConfig: argument 'inner_optimizer' must be one of {INNER_OPTIMIZERS}, "
                             f"got {self.inner_optimizer!r}")
        for name in ("meta_steps", "tasks_per_batch", "inner_steps", "batch_size", "query_batch_size", "seq_len",
                     "checkpoint_every"):
            v = getattr(self, name)
            low = 1 if name in ("tasks_per_batch", "batch_size", "query_batch_size", "seq_len") else 0
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"PrepConfig: argument {name!r} must be an int >= {low}, got {v!r}")
        if self.algorithm == "reptile" and self.inner_steps < 1:
            raise ValueError("PrepConfig: algorithm='reptile' needs inner_steps >= 1")
        for name in ("inner_lr", "outer_lr"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
                raise ValueError(f"PrepConfig: argument {name!r} must be a positive float, got {v!r}")
        self.adam_betas = tuple(self.adam_betas)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["adam_betas"] = list(self.adam_betas)
        return d


def fast_parameter_names(model: nn.Module, *, cells: bool = False) -> list[str]:
    """Names of the parameters the inner loop adapts: the TARP factors (``...tarp_*``) and, with
    ``cells``, the weights of the TAMS searched cells (``...tams_cell.*``).

    Both are stacked ``[T, ...]`` per task in the batched inner loop: TARP layers route rows to
    their task's factors through ``task_index``, cells read each sequence's task from the active
    architecture (:mod:`tarp_fast.tams.cell`, "Per-task weights"). The TAMS controller is slow.
    """
    names = []
    for n, _ in model.named_parameters():
        if n.rsplit(".", 1)[-1].startswith(TARP_PARAM_PREFIX) or (cells and f".{CELL_NAME}." in f".{n}"):
            names.append(n)
    if not any(n.rsplit(".", 1)[-1].startswith(TARP_PARAM_PREFIX) for n in names):
        raise ValueError("fast_parameter_names: the model has no TARP factors; call tarp_fast.patch_model(model) first")
    return names


@contextlib.contextmanager
def stacked_tasks(model: nn.Module, num_tasks: int):
    """Declare every single-task :class:`TARPLinear` of ``model`` a ``num_tasks``-task layer for the block.

    Inside it the layers route each row's task id to its slice of factors passed in with a
    leading ``[num_tasks]`` dimension (through ``functional_call``); the stored parameters are
    untouched and the declaration is undone on exit.
    """
    layers = [m for m in model.modules() if isinstance(m, TARPLinear)]
    if any(m.num_tasks != 1 for m in layers):
        raise ValueError("stacked_tasks: the model's TARP layers must be single-task (num_tasks=1); the "
                         "preparation stage stacks the per-task copies itself")
    for m in layers:
        m.num_tasks = int(num_tasks)
    try:
        yield
    finally:
        for m in layers:
            m.num_tasks = 1


@contextlib.contextmanager
def reference_backend(model: nn.Module):
    """Run the TARP layers on the plain-PyTorch reference backend inside the block.

    Second-order MAML differentiates the inner gradients again; the fused backends implement a
    first-order backward only, the reference is plain autograd and supports any order. For the
    same reason attention runs in transformers' ``eager`` implementation (PyTorch's fused CPU
    attention has no double backward).
    """
    layers = [m for m in model.modules() if isinstance(m, TARPLinear)]
    saved = [m.backend for m in layers]
    cfg = getattr(model, "config", None)
    attn = getattr(cfg, "_attn_implementation", None)
    for m in layers:
        m.backend = "reference"
    if attn is not None and attn != "eager":
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        for m, b in zip(layers, saved):
            m.backend = b
        if attn is not None and attn != "eager":
            model.set_attn_implementation(attn)


def _dist():
    import torch.distributed as dist  # noqa: PLC0415

    if dist.is_available() and dist.is_initialized():
        return dist
    return None


def _is_dtensor(t) -> bool:
    """A parameter sharded by FSDP2 (a ``DTensor``), without importing torch.distributed for others."""
    return type(t).__name__ == "DTensor" and hasattr(t, "full_tensor")


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformers model, the units FSDP2 shards one at a time.

    The classes named in ``model._no_split_modules`` (``GPT2Block``, ``LlamaDecoderLayer``, ...),
    else transformers' ``GradientCheckpointingLayer`` instances; outermost first, none nested.
    """
    names = set(getattr(model, "_no_split_modules", None) or ())
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer  # noqa: PLC0415
    except ImportError:  # older transformers
        GradientCheckpointingLayer = ()  # noqa: N806
    found: list[nn.Module] = []
    for m in model.modules():
        if m is model or any(m in set(b.modules()) for b in found):
            continue
        if type(m).__name__ in names or (GradientCheckpointingLayer and isinstance(m, GradientCheckpointingLayer)):
            found.append(m)
    return found


def shard_for_preparation(model: nn.Module, *, tams: bool = False, mesh=None, mp_policy=None) -> nn.Module:
    """Shard ``model`` with FSDP2 for :func:`prepare` (``fsdp=True``); in place, returns it.

    ``fully_shard`` on each of :func:`transformer_blocks`, then on the root, with the fast
    parameters (:func:`fast_parameter_names`) in ``ignored_params``: every rank keeps them whole
    for the inner loop. With ``tams`` the TAMS controller and the input embeddings stay whole as
    well (they run before the forward: the task embeddings and the architectures; decoder-only
    models). Gradients are summed over ranks (divide factor 1); the whole parameters' gradients
    are all-reduced by the :class:`MetaLearner`. ``mesh``: a 1-D
    ``DeviceMesh`` (default: every rank, on the parameters' device type); ``mp_policy``: an
    FSDP2 ``MixedPrecisionPolicy``. Needs ``torch.distributed`` initialized.
    """
    from torch.distributed.device_mesh import init_device_mesh  # noqa: PLC0415
    from torch.distributed.fsdp import FSDPModule, fully_shard  # noqa: PLC0415

    dist = _dist()
    if dist is None:
        raise RuntimeError("shard_for_preparation: torch.distributed is not initialized (launch with torchrun and "
                           "call torch.distributed.init_process_group first)")
    params = dict(model.named_parameters())
    ignored = {params[n] for n in fast_parameter_names(model, cells=tams)}
    if tams:
        # run outside the model's forward (before it, to make each task's architecture), where
        # FSDP would not gather them: the controller and the input embeddings the task
        # embeddings are read from stay whole too
        controller = getattr(model, "tams_controller", None)
        if controller is not None:
            ignored |= set(controller.parameters())
        ignored |= set(model.get_input_embeddings().parameters())
    if mesh is None:
        device_type = next(model.parameters()).device.type
        mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    kw = {"mesh": mesh, "ignored_params": ignored}
    if mp_policy is not None:
        kw["mp_policy"] = mp_policy
    blocks = transformer_blocks(model)
    if not blocks:
        raise ValueError(f"shard_for_preparation: found no transformer blocks in {type(model).__name__} "
                         "(no _no_split_modules class, no GradientCheckpointingLayer)")
    for block in blocks:
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            setter = getattr(m, "set_gradient_divide_factor", None) or m.set_reduce_scatter_divide_factor
            setter(1.0)
            if hasattr(m, "set_force_sum_reduction_for_comms"):
                m.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM)
    return model


class MetaLearner:
    """Runs meta-steps of the preparation stage on ``model`` (patched with single-task TARP layers).

    Args:
        model: the model; its TARP factors are the shared initialization ``φ``.
        config: :class:`PrepConfig`.
        tams: run the TAMS controller: each task's architecture is sampled from the embedding of
            its support windows and applied with :func:`tarp_fast.tams.use_architecture`.
    """

    def __init__(self, model: nn.Module, config: PrepConfig, *, tams: bool = False):
        self.model = model
        self.config = config
        self.fast_names = fast_parameter_names(model, cells=tams)
        params = dict(model.named_parameters())
        self.fast = {n: params[n] for n in self.fast_names}
        self.slow = [p for _, p in model.named_parameters()]  # named_parameters dedups tied weights
        for p in self.slow:
            p.requires_grad_(True)
        self.log_lr = nn.ParameterDict()
        if config.learn_inner_lr:
            for n in self.fast_names:
                p = self.fast[n]
                self.log_lr[n.replace(".", "__")] = nn.Parameter(
                    torch.tensor(math.log(config.inner_lr), dtype=p.dtype, device=p.device))
        self.outer_params = self.slow + list(self.log_lr.values())
        self.opt = torch.optim.AdamW(self.outer_params, lr=config.outer_lr, weight_decay=0.0, foreach=False)
        self.tams = bool(tams)
        self.step = 0
        #: CUDA devices whose RNG state the checkpoints carry (those holding the model's parameters)
        self.cuda_devices = sorted({p.get_device() for p in model.parameters() if p.is_cuda})
        dist = _dist()
        self.rank = dist.get_rank() if dist else 0
        self.world = dist.get_world_size() if dist else 1
        #: sharded by FSDP2 (shard_for_preparation): some parameters are DTensors
        self.fsdp = any(_is_dtensor(p) for p in self.slow)
        if self.fsdp:
            if any(_is_dtensor(self.fast[n]) for n in self.fast_names):
                raise ValueError("MetaLearner: the fast parameters must not be sharded (FSDP2 ignored_params); use "
                                 "tarp_fast.meta.prepare.shard_for_preparation(model)")
            if config.algorithm == "maml":
                raise ValueError("MetaLearner: algorithm='maml' (second order) is not supported with FSDP2: use "
                                 "'fomaml' or 'reptile', or run unsharded")
            if config.tasks_per_batch % self.world:
                raise ValueError(f"MetaLearner: with FSDP2 every rank must run the same collectives: tasks_per_batch "
                                 f"{config.tasks_per_batch} must be divisible by the world size {self.world}")
            if not config.batched:
                raise ValueError("MetaLearner: FSDP2 needs batched=True (one forward per inner step on every rank)")

    # ---- inner loop --------------------------------------------------------------------------
    def _lr(self, name: str):
        if self.config.learn_inner_lr:
            return self.log_lr[name.replace(".", "__")].exp()
        return self.config.inner_lr

    def _task_losses(self, fast: dict[str, torch.Tensor], ids: torch.Tensor, T: int, arch_ctx) -> torch.Tensor:
        """Mean loss of each task: ``ids [T, B, L] -> [T]``, all tasks in one forward."""
        B, L = ids.shape[1], ids.shape[2]
        task_index = torch.arange(T).repeat_interleave(B)
        if T == 1:  # one task: plain single-task layers, the factors without their task dimension
            with arch_ctx(task_index):
                losses = sequence_losses(self.model, ids.reshape(B, L), params={n: f[0] for n, f in fast.items()})
            return losses.mean().view(1)
        with stacked_tasks(self.model, T), tarp_context(task_index=task_index), arch_ctx(task_index):
            losses = sequence_losses(self.model, ids.reshape(T * B, L), params=fast)
        return losses.view(T, B).mean(1)

    def _adapt(self, support: torch.Tensor, arch_ctx) -> tuple:
        """Inner loop for ``T`` tasks at once. Returns ``(fast, directions, pre)``.

        ``pre``: the summed support loss before adaptation (the first inner step's loss, so it
        costs no extra forward).

        ``fast[name]``: ``[T, ...]`` adapted factors (leaves under first order, graph nodes under
        second order); ``directions[name]``: ``Σ_j d^j`` (detached), for the learned-LR gradient.
        """
        cfg = self.config
        T = support.shape[0]
        second = cfg.algorithm == "maml"
        fast, dirs, m, v = {}, {}, {}, {}
        for n, p in self.fast.items():
            stacked = p.unsqueeze(0).expand(T, *p.shape)
            fast[n] = stacked.clone() if second else stacked.detach().clone().requires_grad_(True)
            dirs[n] = torch.zeros_like(stacked, memory_format=torch.contiguous_format).detach()
        b1, b2 = cfg.adam_betas
        pre = 0.0
        for j in range(cfg.inner_steps):
            loss = self._task_losses(fast, support[:, j], T, arch_ctx).sum()
            if j == 0:
                pre = float(loss.detach())
            if not bool(torch.isfinite(loss)):
                raise NonFiniteLossError(f"prepare: non-finite inner loss at meta-step {self.step}, inner step {j}")
            # allow_unused: a cell op no task chose this step is not in the graph (gradient 0)
            grads = torch.autograd.grad(loss, [fast[n] for n in self.fast_names], create_graph=second,
                                        allow_unused=True)
            new = {}
            for n, g in zip(self.fast_names, grads):
                if g is None:
                    g = torch.zeros_like(fast[n])
                if cfg.inner_optimizer == "adam":
                    m[n] = (1 - b1) * g if j == 0 else b1 * m[n] + (1 - b1) * g
                    v[n] = (1 - b2) * g * g if j == 0 else b2 * v[n] + (1 - b2) * g * g
                    mhat, vhat = m[n] / (1 - b1 ** (j + 1)), v[n] / (1 - b2 ** (j + 1))
                    d = mhat / (vhat.sqrt() + cfg.adam_eps)
                else:
                    d = g
                dirs[n] = dirs[n] + d.detach()
                if second:
                    new[n] = fast[n] - self._lr(n) * d
                else:
                    with torch.no_grad():
                        lr = float(self._lr(n).detach()) if self.config.learn_inner_lr else self.config.inner_lr
                        new[n] = (fast[n] - lr * d).requires_grad_(True)
            fast = new
        return fast, dirs, pre

    # ---- one meta-step -----------------------------------------------------------------------
    def _local_tasks(self, batch: TaskBatch) -> list[int]:
        return list(range(self.rank, len(batch.domains), self.world))

    def meta_step(self, batch: TaskBatch) -> dict:
        """One outer update from ``batch``; returns ``{"query_loss", "support_loss", ...}`` (global means)."""
        if self.config.algorithm == "maml":
            with reference_backend(self.model):
                return self._meta_step(batch)
        return self._meta_step(batch)

    def _meta_step(self, batch: TaskBatch) -> dict:
        cfg = self.config
        T_global = len(batch.domains)
        mine = batch.select(self._local_tasks(batch))
        self.opt.zero_grad(set_to_none=True)
        for p in self.outer_params:
            p.grad = torch.zeros_like(p)
        sums = torch.zeros(3, dtype=torch.float64)  # query loss, pre-adaptation support loss, tasks
        if len(mine.domains):
            groups = [list(range(len(mine.domains)))] if cfg.batched else [[t] for t in range(len(mine.domains))]
            for group in groups:
                sums += self._meta_grad(mine.select(group), T_global)
        self._all_reduce(sums)
        if cfg.grad_clip:
            if self.fsdp:
                self._clip_sharded(cfg.grad_clip)
            else:
                torch.nn.utils.clip_grad_norm_(self.slow, cfg.grad_clip)
        self.opt.step()
        self.step += 1
        q, s = float(sums[0] / T_global), float(sums[1] / T_global)
        if not (math.isfinite(q) and math.isfinite(s)):
            raise NonFiniteLossError(f"prepare: non-finite meta-loss at meta-step {self.step - 1} (query {q}, support {s})")
        out = {"step": self.step - 1, "query_loss": q, "support_loss": s}
        if cfg.learn_inner_lr:
            out["inner_lr"] = {k: float(p.detach().exp()) for k, p in self.log_lr.items()}
        return out

    def _meta_grad(self, batch: TaskBatch, T_global: int) -> torch.Tensor:
        """Accumulate this group's share of the meta-gradient into ``.grad``; return loss sums."""
        cfg = self.config
        T = len(batch.domains)
        support = batch.support  # [T, k, B, L]
        query = batch.query      # [T, Bq, L]
        ctx_support = support.reshape(T, -1, support.shape[-1])
        if self.tams:
            # one architecture per task for the whole inner loop and query: sampled once
            arch_factory = self._tams_factory(ctx_support)
        else:
            arch_factory = lambda ti: contextlib.nullcontext()  # noqa: E731
        fast, dirs, pre = self._adapt(support, arch_factory)
        q_losses = self._task_losses(fast, query, T, arch_factory)  # [T]
        meta = q_losses.sum() / T_global
        if cfg.algorithm == "maml":
            meta.backward()
        else:
            leaves = [fast[n] for n in self.fast_names]
            if self.fsdp:
                # FSDP2 computes the gradients of the gathered (unsharded) parameters, then
                # reduce-scatters them into the sharded ones: they cannot be listed as inputs
                meta.backward()
            else:
                meta.backward(inputs=self.slow + leaves)  # slow params and the adapted leaves only
            for n in self.fast_names:
                p, leaf = self.fast[n], fast[n]
                g_leaf = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
                if cfg.algorithm == "fomaml":
                    # the fast copy is the parameter's own: replace the (unused) direct grad
                    p.grad.add_(g_leaf.sum(0))
                else:  # reptile: the init moves toward the mean adapted factors
                    p.grad.add_((p.detach().unsqueeze(0) - leaf.detach()).sum(0) / T_global)
                if cfg.learn_inner_lr:
                    key = n.replace(".", "__")
                    lr = float(self.log_lr[key].detach().exp())
                    # dL/dlog α = dL/dα · α,  dL/dα = −<∇_{φ'} L, Σ_j d^j>
                    self.log_lr[key].grad.add_(-(g_leaf * dirs[n]).sum() * lr)
        return torch.tensor([float(q_losses.detach().sum()), float(pre), float(T)], dtype=torch.float64)

    def _tams_factory(self, supports: torch.Tensor):
        from ..tams import task_embeddings, use_architecture  # noqa: PLC0415

        with torch.no_grad():
            emb = task_embeddings(self.model, [s for s in supports])
        arch = self.model.tams_controller.sample(emb, step=self.step,
                                                 generator=step_generator(self.config.seed, self.step, 31))
        return lambda ti: use_architecture(self.model, arch, task_index=ti)

    def _clip_sharded(self, max_norm: float) -> None:
        """``clip_grad_norm_`` over sharded (DTensor) and replicated gradients: the norm of the
        full gradient, its sharded part summed over ranks."""
        dist = _dist()
        sharded = torch.zeros((), dtype=torch.float64)
        whole = torch.zeros((), dtype=torch.float64)
        for p in self.slow:
            if p.grad is None:
                continue
            if _is_dtensor(p.grad):
                sharded += p.grad.to_local().detach().double().pow(2).sum().cpu()
            else:
                whole += p.grad.detach().double().pow(2).sum().cpu()
        if dist is not None:
            dev = next(p for p in self.slow if _is_dtensor(p)).to_local().device
            sharded = sharded.to(dev)
            dist.all_reduce(sharded)
            sharded = sharded.cpu()
        total = float((sharded + whole).sqrt())
        coef = max_norm / (total + 1e-6)  # as clip_grad_norm_
        if coef < 1.0:
            for p in self.slow:
                if p.grad is not None:
                    p.grad.mul_(coef)

    def _all_reduce(self, sums: torch.Tensor) -> None:
        dist = _dist()
        if dist is None:
            return
        # under FSDP2 the sharded gradients are already reduce-scattered: reduce the others
        grads = [p.grad for p in self.outer_params if not _is_dtensor(p)]
        flat = torch.cat([g.reshape(-1) for g in grads] + [sums.to(grads[0].dtype)])
        dist.all_reduce(flat)
        off = 0
        for g in grads:
            g.copy_(flat[off:off + g.numel()].view_as(g))
            off += g.numel()
        sums.copy_(flat[off:off + sums.numel()].to(sums.dtype))

    # ---- state -------------------------------------------------------------------------------
    def state_tensors(self) -> tuple:
        """Full tensors of the parameters, inner learning rates, optimizer state and RNG.

        Under FSDP2 the sharded tensors are gathered: every rank must call it (collectives)."""
        tensors = {f"param.{n}": _full(p.detach()) for n, p in self.model.named_parameters()}
        tensors.update({f"log_lr.{k}": p.detach() for k, p in self.log_lr.items()})
        opt_t, opt_meta = optimizer_state_to_flat(self.opt) if not self.fsdp else _optimizer_state_full(self.opt)
        tensors.update(opt_t)
        rng_t, rng_meta = rng_state(self.cuda_devices)
        tensors.update(rng_t)
        return tensors, {"optimizer": opt_meta, "rng": rng_meta, "step": self.step}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        params = dict(self.model.named_parameters())
        want = {f"param.{n}" for n in params}
        have = {k for k in tensors if k.startswith("param.")}
        if want != have:
            raise ValueError(f"MetaLearner.load: checkpoint parameters differ from the model's: missing "
                             f"{sorted(want - have)[:5]}, unexpected {sorted(have - want)[:5]}")
        with torch.no_grad():
            for n, p in params.items():
                t = tensors[f"param.{n}"]
                if t.shape != p.shape:
                    raise ValueError(f"MetaLearner.load: parameter {n!r} is {list(t.shape)} in the checkpoint, "
                                     f"{list(p.shape)} in the model")
                p.copy_(_like(p, t))
            for k, p in self.log_lr.items():
                p.copy_(tensors[f"log_lr.{k}"])
        if self.fsdp:  # full tensors in the checkpoint: shard each like its parameter
            params = [q for g in self.opt.param_groups for q in g["params"]]  # the state dict's indices
            tensors = dict(tensors)
            for key in [k for k in tensors if k.startswith("optim.")]:
                _, idx, name = key.split(".", 2)
                p = params[int(idx)]
                if _is_dtensor(p) and tensors[key].shape == p.shape:
                    tensors[key] = _like(p, tensors[key])
        optimizer_state_from_flat(self.opt, tensors, meta["optimizer"])
        set_rng_state(tensors, meta["rng"])
        self.step = int(meta["step"])


def gather_full_state_dict(model: nn.Module) -> dict:
    """The full state dict of a model sharded by :func:`shard_for_preparation`, on CPU.

    Every rank must call it (collectives); rank 0 gets the tensors, the other ranks ``{}``. Load it
    into an unsharded copy of the model (e.g. one kept on rank 0 before :func:`prepare`) to save
    the base and the adapter as without FSDP. An unsharded model: its own state dict.
    """
    if not any(_is_dtensor(p) for p in model.parameters()):
        return dict(model.state_dict())
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # noqa: PLC0415

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2-sharded ``DTensor`` (all-gathered), else ``t``."""
    return t.full_tensor() if _is_dtensor(t) else t


def _like(p: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """``full`` laid out like ``p``: this rank's shard when ``p`` is a sharded ``DTensor``."""
    if not _is_dtensor(p):
        return full
    from torch.distributed.tensor import distribute_tensor  # noqa: PLC0415

    return distribute_tensor(full.to(device=p.device, dtype=p.dtype), p.device_mesh, p.placements)


def _optimizer_state_full(opt: torch.optim.Optimizer) -> tuple:
    """:func:`optimizer_state_to_flat` with each sharded state tensor gathered (every rank calls it)."""
    sd = opt.state_dict()  # its "state" holds the optimizer's live per-parameter dicts: copied, not written
    state = {i: {k: _full(v) for k, v in st.items()} for i, st in sd["state"].items()}
    return optimizer_state_to_flat(_StateDictOnly({**sd, "state": state}))


class _StateDictOnly:
    def __init__(self, sd):
        self._sd = sd

    def state_dict(self):
        return self._sd


#: Settings that may differ between a checkpoint and the run resuming from it (see :func:`prepare`).
RESUME_MAY_CHANGE = ("meta_steps", "checkpoint_every", "world_size")
_UNSET = "(not set)"


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and k != "extra":
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _settings_view(config: dict, *, tams, sampler: dict, world_size, run: Optional[dict]) -> dict:
    """Everything a preparation run's result depends on (and the allowed changes), flat, JSON-normalized."""
    view = dict(config)
    view.update({"tams": tams, "domains": list(sampler.get("names", [])), "sampler_seed": sampler.get("seed"),
                 "world_size": world_size})
    for k, v in (run or {}).items():
        view[k if k not in view else f"run.{k}"] = v
    return json.loads(json.dumps(_flatten(view)))


def _show(v) -> str:
    return v if v is _UNSET else repr(v)


def _check_resume(meta: dict, current: dict, step: int, config: PrepConfig, directory: str, name: str) -> dict:
    """``{setting: [checkpointed, new]}`` of the allowed changes; ``ValueError`` listing any other change."""
    old = _settings_view(meta.get("config", {}), tams=meta.get("tams"), sampler=meta.get("sampler", {}),
                         world_size=meta.get("world_size"), run=meta.get("run"))
    diff = {}
    for k in list(current) + [k for k in old if k not in current]:
        a, b = old.get(k, _UNSET), current.get(k, _UNSET)
        if a != b:
            diff[k] = (a, b)
    if "sampler_seed" in diff and diff.get("seed") == diff["sampler_seed"]:
        del diff["sampler_seed"]  # the sampler draws from the run's seed: one change, reported once
    refused = {k: v for k, v in diff.items() if k not in RESUME_MAY_CHANGE}
    if refused:
        listed = ", ".join(f"{k} {_show(a)} -> {_show(b)}" for k, (a, b) in refused.items())
        raise ValueError(
            f"prepare: cannot resume from {directory}: settings differ from the checkpoint {name} (meta-step {step}): "
            f"{listed}. Resume with the checkpoint's settings, or start over with --no-resume (prepare(resume=False)) "
            f"or a new --out folder; only {', '.join(RESUME_MAY_CHANGE)} may change on resume")
    if config.meta_steps < step:
        raise ValueError(f"prepare: cannot resume from {directory}: the checkpoint {name} is at meta-step {step}, past "
                         f"meta_steps={config.meta_steps}; pass meta_steps >= {step} (--meta-steps), or start over with "
                         "--no-resume or a new --out folder")
    return {k: [a, b] for k, (a, b) in diff.items()}


def prepare(
    model: nn.Module,
    sampler: TaskSampler,
    config: PrepConfig,
    *,
    tams: bool = False,
    checkpoint_dir: Optional[str] = None,
    resume: bool = True,
    log_path: Optional[str] = None,
    progress: bool = False,
    stop_after: Optional[int] = None,
    on_step: Optional[Callable[[dict], None]] = None,
    run_settings: Optional[dict] = None,
    fsdp: bool = False,
) -> dict:
    """Run ``config.meta_steps`` meta-steps of preparation on ``model`` (in place).

    ``fsdp``: shard the model with FSDP2 first (:func:`shard_for_preparation`; see the module
    docstring), for a model that does not fit one device; needs ``torch.distributed``
    initialized (``torchrun``). A model already sharded that way is used as it is. Without it,
    a distributed run keeps a whole model on every rank and all-reduces the outer gradient.
    ``fsdp`` does not change what a step computes (up to the rounding of the reductions), so a
    run may resume with or without it.

    ``checkpoint_dir``: write a checkpoint every ``config.checkpoint_every`` steps and at the
    end, and (with ``resume``) continue from the newest intact one found there (see
    :class:`~tarp_fast.meta.checkpoint.Checkpointer`: the folder is listed, a damaged newest
    checkpoint is skipped with a warning); the resumed run's parameters and losses equal an
    uninterrupted run's bitwise on CPU. ``log_path``: JSONL, one record per meta-step
    (rewritten up to the resumed step on resume, every field kept; ``seconds`` is the compute
    time since the run began, summed over its resumed parts). ``stop_after``: return after that
    many meta-steps of this call (used to simulate an interruption). ``run_settings``: a
    JSON-ready dict of settings outside ``config`` that the run depends on (the CLI passes the
    base model, corpus and TARP settings); stored in the checkpoints and compared on resume.

    **Resuming with other settings.** Every setting of ``config``, ``tams``, the sampler's seed
    and domains and every entry of ``run_settings`` must equal the checkpoint's, or resuming
    raises a ``ValueError`` listing each difference (checkpointed -> new) and how to proceed.
    Only these may change (:data:`RESUME_MAY_CHANGE`), since they do not change what a step
    computes: ``meta_steps`` (to extend a run; not below the checkpoint's step),
    ``checkpoint_every``, and ``world_size`` (the number of ``torchrun`` processes: the same
    update, up to the rounding of the all-reduce). An allowed change is recorded with the
    meta-step it applied from: in the first log record after the resume (``settings_changed``)
    and in ``resumes`` of the result and of later checkpoints. Flags that only show or log
    progress are not settings. ``resume=False`` starts over; its first checkpoint removes the
    old run's newer checkpoints.

    **Randomness.** The run draws from its own torch RNG (CPU and the model's CUDA devices) and
    Python ``random``: seeded from ``config.seed`` on a fresh start, restored from the checkpoint
    on resume, and the caller's RNG states are restored on return. So the same seed gives
    bitwise the same run even when the model draws random numbers itself: the model runs in the
    mode the caller left it in, and a model in train mode with dropout (e.g. a GPT-2 loaded
    with ``--model``, dropout 0.1) keeps its dropout, as fine-tuning it would (set its
    ``*_pdrop`` to 0 in the config to turn it off).

    Returns ``{"steps", "seconds" (of this call), "losses": [query loss per step], "resumes":
    [{"step", "changed"}], "learner": MetaLearner}``.
    Raises :class:`NonFiniteLossError` when a loss becomes NaN/inf.
    """
    if sampler.tasks_per_batch != config.tasks_per_batch or sampler.inner_steps != max(config.inner_steps, 1):
        raise ValueError("prepare: the sampler's tasks_per_batch/inner_steps must equal the config's "
                         f"({sampler.tasks_per_batch}/{sampler.inner_steps} vs {config.tasks_per_batch}/{config.inner_steps})")
    if not isinstance(fsdp, bool):
        raise TypeError(f"prepare: argument 'fsdp' must be a bool, got {type(fsdp).__name__}")
    if fsdp and not any(_is_dtensor(p) for p in model.parameters()):
        shard_for_preparation(model, tams=tams)
    cuda = sorted({p.get_device() for p in model.parameters() if p.is_cuda})
    py_state = random.getstate()
    with torch.random.fork_rng(devices=cuda):
        try:
            return _prepare(model, sampler, config, tams=tams, checkpoint_dir=checkpoint_dir, resume=resume,
                            log_path=log_path, progress=progress, stop_after=stop_after, on_step=on_step,
                            run_settings=run_settings, cuda=cuda)
        finally:
            random.setstate(py_state)


def _prepare(model, sampler, config, *, tams, checkpoint_dir, resume, log_path, progress, stop_after, on_step,
             run_settings, cuda) -> dict:
    learner = MetaLearner(model, config, tams=tams)
    ckpt = Checkpointer(checkpoint_dir) if checkpoint_dir else None
    current = _settings_view(config.to_dict(), tams=bool(tams), sampler=sampler.state_dict(),
                             world_size=learner.world, run=run_settings)
    history: list[dict] = []
    resumes: list[dict] = []
    changed: dict = {}
    if ckpt is not None and resume and ckpt.exists():
        try:
            step, tensors, meta = ckpt.load(fallback=True)
        except CheckpointError as exc:
            raise CheckpointError(f"prepare: cannot resume: {exc}; start over with --no-resume (prepare(resume=False)) "
                                  "or a new --out folder") from None
        where = os.path.join(ckpt.directory, ckpt.loaded + ".json")
        for field_name, sub in (("meta.learner.step", meta.get("learner", {})), ("meta.sampler.step", meta.get("sampler", {}))):
            if sub.get("step") != step:
                raise ValueError(f"prepare: {where}: field {field_name!r} is {sub.get('step')!r} but the checkpoint "
                                 f"is meta-step {step}")
        changed = _check_resume(meta, current, step, config, ckpt.directory, ckpt.loaded)
        learner.load_state_tensors(tensors, meta["learner"])  # also restores the RNG states
        sampler.load_state_dict(meta["sampler"])
        history = list(meta.get("history", []))
        resumes = list(meta.get("resumes", [])) + [{"step": step, "changed": changed}]
    else:
        torch.random.default_generator.manual_seed(config.seed)
        for d in cuda:
            with torch.cuda.device(d):
                torch.cuda.manual_seed(config.seed)
        random.seed(config.seed)
    if log_path and learner.rank == 0:
        with open(log_path, "w", encoding="utf-8") as fh:  # keep the records up to the resumed step
            for rec in history:
                fh.write(json.dumps(rec) + "\n")
    bar = None
    if progress and learner.rank == 0:
        from tqdm.auto import tqdm  # noqa: PLC0415

        bar = tqdm(total=config.meta_steps, initial=learner.step, desc=f"prepare ({config.algorithm})",
                   leave=False, dynamic_ncols=True)
    t0 = time.perf_counter()
    t_before = float(history[-1].get("seconds", 0.0)) if history else 0.0
    done = 0
    while learner.step < config.meta_steps:
        if stop_after is not None and done >= stop_after:
            break
        sampler.step = learner.step
        rec = learner.meta_step(sampler.next())
        rec["domains"] = sampler.tasks_at(rec["step"])
        rec["seconds"] = t_before + time.perf_counter() - t0
        if changed and done == 0:
            rec["settings_changed"] = changed
        history.append(dict(rec))
        if log_path and learner.rank == 0:
            with open(log_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(rec) + "\n")
        if on_step is not None:
            on_step(rec)
        done += 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(query=f"{rec['query_loss']:.3f}")
        last = learner.step == config.meta_steps
        due = last or (config.checkpoint_every and learner.step % config.checkpoint_every == 0)
        # under FSDP2 every rank gathers the full tensors (collectives); rank 0 writes them
        if ckpt is not None and due and (learner.rank == 0 or learner.fsdp):
            tensors, meta = learner.state_tensors()
        if ckpt is not None and due and learner.rank == 0:
            ckpt.save(learner.step, tensors, {"learner": meta, "sampler": sampler.state_dict(),
                                              "config": config.to_dict(), "tams": bool(tams), "run": run_settings,
                                              "world_size": learner.world, "history": history, "resumes": resumes})
    if bar is not None:
        bar.close()
    return {"steps": learner.step, "seconds": time.perf_counter() - t0,
            "losses": [h["query_loss"] for h in history], "resumes": resumes, "learner": learner}
