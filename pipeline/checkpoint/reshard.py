"""Resuming a ZeRO-1 checkpoint on a different world size, which DeepSpeed refuses to do by itself.

Written against DeepSpeed 0.19.8 (the version pinned in pyproject.toml). Besides the public
``engine.load_checkpoint(..., load_module_only=True)`` and the key names in
``deepspeed.checkpoint.constants``, it relies on two private methods of
``deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer``:

* ``_restore_elastic_base_optimizer_state(all_state_dict)``: re-partitions the optimizer state of every
  old partition over the current ranks (DeepSpeed's own elastic-checkpoint path);
* ``_link_all_hp_params()``: re-links the fp16/bf16 parameters to their fp32 partitions.

When either is missing on the installed DeepSpeed, resharding fails up front with a CheckpointError
(nothing is half-loaded); resuming at the old world size needs neither.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipeline.checkpoint.layout import CheckpointError

PRIVATE_METHODS = ("_restore_elastic_base_optimizer_state", "_link_all_hp_params")
WRITTEN_FOR = "0.19.8"


def load_zero1_resharded(engine: Any, root: Path, tag: str, *, old_world: int, new_world: int) -> None:
    """Load ``root/tag``, written by ``old_world`` ranks under ZeRO-1, into ``engine`` on ``new_world`` ranks.

    The weights come from the model file (and refresh the fp32 partitions); the optimizer state of every
    old partition is un-padded and handed to DeepSpeed's own elastic re-partitioning."""
    opt = engine.optimizer
    missing = [m for m in PRIVATE_METHODS if not callable(getattr(opt, m, None))]
    if missing:
        import deepspeed  # heavy: only this refusal names its version

        raise CheckpointError(
            f"checkpoint {tag} was written by {old_world} ranks with ZeRO-1 and this run has {new_world}: "
            f"resharding it is unsupported on DeepSpeed {deepspeed.__version__} (its {type(opt).__name__} lacks "
            f"{', '.join(missing)}; this code was written for DeepSpeed {WRITTEN_FOR}); resume at the old world "
            f"size ({old_world} ranks), or install deepspeed=={WRITTEN_FOR}"
        )
    from deepspeed.checkpoint.constants import (  # heavy: only a resharding resume needs it
        BASE_OPTIMIZER_STATE,
        BASE_OPTIMIZER_STATE_STEP,
        GROUP_PADDINGS,
        OPTIMIZER_STATE_DICT,
        SINGLE_PARTITION_OF_FP32_GROUPS,
    )

    path, _ = engine.load_checkpoint(str(root), tag=tag, load_module_only=True)
    if path is None:
        raise CheckpointError(f"DeepSpeed found no checkpoint in {root / tag}")
    states = []
    for r in range(old_world):
        f = root / tag / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"
        sd = torch.load(f, map_location="cpu", weights_only=False)[OPTIMIZER_STATE_DICT]
        base = sd[BASE_OPTIMIZER_STATE]
        groups = []
        for i, fp32 in enumerate(sd[SINGLE_PARTITION_OF_FP32_GROUPS]):
            n = fp32.numel()  # saved without padding; the optimizer state still has it
            st = base["state"].get(i, {}) if isinstance(base, dict) else base[i]
            groups.append({k: (v.flatten()[:n] if torch.is_tensor(v) and v.numel() >= n else v) for k, v in st.items()})
        step = base["param_groups"][0].get("step") if isinstance(base, dict) else None
        states.append(
            {
                BASE_OPTIMIZER_STATE: groups,
                BASE_OPTIMIZER_STATE_STEP: step,
                SINGLE_PARTITION_OF_FP32_GROUPS: sd[SINGLE_PARTITION_OF_FP32_GROUPS],
                GROUP_PADDINGS: sd.get(GROUP_PADDINGS),
            }
        )
    opt._restore_elastic_base_optimizer_state(states)
    opt._link_all_hp_params()
