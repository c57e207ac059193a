"""Non-finite training steps, caught without a host sync per step.

Reading the loss on the host after every step (``loss.item()``) makes the CPU wait for the GPU
each step, so the GPU idles while the next step's kernels are launched: for VAEs, whose steps
are short, that wait is a large part of the step. Instead the optimizer skips a bad update on
the device, and the per-step (loss, recon, KL, flag) records are read in one sync every
``check_interval`` steps, where a non-finite step stops the run (naming its step) or is
reported as skipped, exactly as if it had been checked at once.

How an update is skipped on the device (``skip_mode``):
- ``"scaler"``: fp16's GradScaler already skips steps whose gradients overflow;
- ``"device"``: fused Adam takes a ``found_inf`` flag and leaves weights, moments and its step
  count untouched when it is 1; the flag is computed from the gradients, which DDP has already
  averaged (FSDP's DTensor reduces the flag over the shards), so every rank skips together;
- ``"host"``: an optimizer without that flag (an older torch, another device): the loss is
  checked on the host before backward, and the ranks agree through an all-reduce.
"""

from __future__ import annotations

import torch

CUDA_CHECK_INTERVAL = 32  # steps between host reads of the records on an accelerator


def check_interval(device: torch.device) -> int:
    """Steps between host reads: 1 on a CPU (reading is free there), more on accelerators."""
    return 1 if device.type == "cpu" else CUDA_CHECK_INTERVAL


def skip_mode(optimizer: torch.optim.Optimizer, precision) -> str:
    """``"scaler"``, ``"device"`` or ``"host"``: see the module docstring."""
    if getattr(precision, "scaler", None) is not None:
        return "scaler"
    fused = all(group.get("fused") for group in optimizer.param_groups)
    if fused and getattr(optimizer, "_step_supports_amp_scaling", False):
        return "device"
    return "host"


def flag_nonfinite_grads(optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """Set ``optimizer.found_inf`` to 1.0 (a 0-d device tensor) if any gradient holds inf or
    NaN, else 0.0, and return it; the next fused ``step()`` then skips itself when it is 1."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                groups.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
    device = next(iter(groups))[0] if groups else torch.device("cpu")
    found_inf = torch.zeros((), device=device)
    one = torch.ones((), device=device)
    for grads in groups.values():
        # what GradScaler runs before a fused step: one kernel, no sync (scale 1: no change)
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, one)
    optimizer.found_inf = found_inf
    return found_inf
