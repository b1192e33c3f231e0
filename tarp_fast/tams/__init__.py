"""TAMS: task-adaptive model search (MLtD §3.3 and DESIGN.md §5), computing only what is chosen.

* :mod:`.embedding`: task embeddings from a support set (:func:`task_embedding`).
* :mod:`.controller`: the MLP controller, the straight-through Gumbel-softmax / argmax
  estimators, hard-concrete gates, the FLOP budget term (:class:`TAMSController`).
* :mod:`.cell`: the searched FFN cell and its six ops (:class:`SearchedCell`).
* :mod:`.blocks`: where the attention and FFN sublayers of GPT-2, BART and Llama blocks are.
* :mod:`.gates`: the runtime wiring: skipped sublayers are not computed, cells run per task.
* :mod:`.integrate`: :func:`add_tams`, :func:`remove_tams`, :func:`use_architecture`,
  :func:`save_tams`, :func:`load_tams`, :func:`architecture_report`.
"""

from .cell import EDGES, NUM_EDGES, NUM_OPS, OPS, CellPlan, SearchedCell, cell_flops_per_token, make_plan
from .controller import (
    ESTIMATORS,
    SUBLAYERS,
    Architecture,
    TAMSController,
    TemperatureSchedule,
    flop_budget_loss,
    gumbel_softmax_st,
    hard_concrete,
    hard_concrete_deploy,
    hard_concrete_keep_prob,
    straight_through_argmax,
)
from .embedding import task_embedding, task_embedding_dim, task_embeddings
from .integrate import (
    add_tams,
    architecture_report,
    load_tams,
    remove_tams,
    save_tams,
    sublayer_flops,
    tams_record,
    use_architecture,
)

__all__ = [
    "OPS", "EDGES", "NUM_EDGES", "NUM_OPS", "SearchedCell", "CellPlan", "make_plan",
    "cell_flops_per_token",
    "ESTIMATORS", "SUBLAYERS", "Architecture", "TAMSController", "TemperatureSchedule",
    "gumbel_softmax_st", "straight_through_argmax", "hard_concrete", "hard_concrete_deploy",
    "hard_concrete_keep_prob", "flop_budget_loss",
    "task_embedding", "task_embeddings", "task_embedding_dim",
    "add_tams", "remove_tams", "use_architecture", "save_tams", "load_tams", "architecture_report",
    "sublayer_flops", "tams_record",
]
