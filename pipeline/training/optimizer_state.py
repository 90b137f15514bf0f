"""A ZeRO-0 checkpoint's optimizer state to and from DeepSpeed's universal format, so that a
checkpoint of any optimizer layout resumes in any other.

The universal format keeps, for every parameter by name, its fp32 master weights and each
optimizer state tensor whole (``zero/<name>/{fp32,exp_avg,exp_avg_sq,step}.pt``), and the
optimizer's global state (``zero/optimizer_state.pt``); DeepSpeed's ZeRO-1/2 engines load it on
any number of ranks, and DeepSpeed writes it from ZeRO-1/2 checkpoints (``ds_to_universal``). A
ZeRO-0 checkpoint (``mp_rank_00_model_states.pt``) holds the torch optimizer's own state, whole:
under bf16 DeepSpeed's unfused wrapper keeps the fp32 master weights beside it. The two functions
here translate between that and the universal format, one parameter group (what the training
engine builds) by parameter name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

MODEL_STATES = "mp_rank_00_model_states.pt"


def zero0_to_universal(checkpoint: Path, out: Path, names: list[str]) -> None:
    """Write ZeRO-0 checkpoint directory ``checkpoint`` in the universal format into ``out``;
    ``names``: the model's parameter names in the optimizer's order."""
    saved = _load(checkpoint / MODEL_STATES)
    optimizer = saved.get("optimizer")
    if not optimizer:
        raise ValueError(f"{checkpoint / MODEL_STATES} holds no optimizer state")
    if "optimizer_state_dict" in optimizer:  # bf16: the fp32 master weights are the wrapper's
        if "fp32_groups" not in optimizer:
            raise ValueError("its optimizer state is a fused fp16 optimizer's (flat master weights), which is "
                             "not converted")
        state = optimizer["optimizer_state_dict"]
        masters = [t.float() for group in optimizer["fp32_groups"] for t in group]
    else:
        state = optimizer
        masters = [saved["module"][name].float() for name in names]
    group = _only_group(state)
    if len(group["params"]) != len(names) or len(masters) != len(names):
        raise ValueError(f"its optimizer holds {len(group['params'])} parameters, this model {len(names)}")
    steps = [s["step"] for s in state["state"].values() if "step" in s]
    for index, name, master in zip(group["params"], names, masters):
        if tuple(master.shape) != tuple(saved["module"][name].shape):
            raise ValueError(f"its master weights of {name} have shape {tuple(master.shape)}, the model "
                             f"{tuple(saved['module'][name].shape)}")
        # a parameter no step has reached has no state yet: a ZeRO engine holds zeros for it
        moments = state["state"].get(index) or {"exp_avg": torch.zeros_like(master),
                                                "exp_avg_sq": torch.zeros_like(master)}
        folder = out / "zero" / name
        folder.mkdir(parents=True)
        torch.save({"param": master, "cat_dim": 0}, folder / "fp32.pt")
        for key, value in moments.items():
            if key != "step":
                torch.save({"param": value, "cat_dim": 0}, folder / f"{key}.pt")
        if steps:  # the engines check that every parameter has taken the same steps
            torch.save(moments.get("step", steps[0]), folder / "step.pt")
    torch.save({"param_groups": state["param_groups"], "ds_version": saved["ds_version"]},
               out / "zero" / "optimizer_state.pt")
    module = {**saved["module"], **dict(zip(names, masters))}
    torch.save({**saved, "module": module, "optimizer": None}, out / MODEL_STATES)


def universal_to_zero0(universal: Path, out: Path, names: list[str], bf16: bool) -> None:
    """Write the universal checkpoint ``universal`` as a ZeRO-0 checkpoint into ``out``, for an
    engine with (``bf16``) or without bf16; ``names`` as in :func:`zero0_to_universal`."""
    saved = _load(universal / MODEL_STATES)
    group = _only_group(_load(universal / "zero" / "optimizer_state.pt"))
    state, masters = {}, []
    for index, name in enumerate(names):
        folder = universal / "zero" / name
        if not (folder / "fp32.pt").exists():  # not trained (frozen): the module holds it
            masters.append(saved["module"][name].float())
            continue
        masters.append(_load(folder / "fp32.pt")["param"].float())
        state[index] = {f.stem: _load(f) if f.stem == "step" else _load(f)["param"]
                        for f in sorted(folder.glob("*.pt")) if f.stem != "fp32"}
    optimizer: dict[str, Any] = {"state": state, "param_groups": [{**group, "params": list(range(len(names)))}]}
    if bf16:  # DeepSpeed's unfused bf16 wrapper: no loss scaling, the fp32 master weights beside
        optimizer = {"dynamic_loss_scale": False, "cur_scale": 1.0, "cur_iter": saved.get("global_steps", 0),
                     "optimizer_state_dict": optimizer, "fp32_groups": [masters]}
    module = {**saved["module"], **dict(zip(names, masters))}
    out.mkdir(parents=True)
    torch.save({**saved, "module": module, "optimizer": optimizer}, out / MODEL_STATES)


def _load(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=False)


def _only_group(state: dict[str, Any]) -> dict[str, Any]:
    groups = state["param_groups"]
    if len(groups) != 1:
        raise ValueError(f"its optimizer has {len(groups)} parameter groups; only one is converted")
    return groups[0]
