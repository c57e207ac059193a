"""The Fabric a run's settings ask for (accelerator, devices, nodes, strategy, precision,
trackers) and its optimizer."""

from __future__ import annotations

import torch

from fastvae.config import TrainConfig
from fastvae.errors import FastVAEError


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """Adam; the fused implementation wherever torch has it (FSDP's sharded parameters too):
    one kernel for all parameters (~4x faster steps on a CPU than the per-tensor loop), and it
    can skip a step with inf/NaN gradients on the device (see ``fastvae.guard``)."""
    fused = config.accelerator in ("auto", "cpu", "cuda", "gpu")
    try:
        return torch.optim.Adam(model.parameters(), lr=config.lr, fused=fused or None)
    except (RuntimeError, TypeError, ValueError):  # an older torch or an unsupported device
        return torch.optim.Adam(model.parameters(), lr=config.lr)


def make_fabric(config: TrainConfig, callbacks: list | None = None, trackers: bool = True):
    """A Fabric for the config's accelerator/devices/nodes/strategy/precision (and callbacks);
    ``trackers``: with the experiment trackers (``--logger``) started."""
    from lightning_fabric import Fabric

    strategy = config.strategy
    if strategy == "fsdp":
        from fastvae.sharding import fsdp_strategy

        strategy = fsdp_strategy(config.devices * config.num_nodes)
    from fastvae.trackers import make_loggers

    loggers = make_loggers(config.out, config.logger_names(), config.to_dict()) if trackers else []
    kwargs = precision_kwargs(config)
    if config.strategy != "fsdp":  # FSDP's rank 0 torch.saves the full state itself
        from fastvae.fabric_checkpoint_io import DirectCheckpointIO

        kwargs["plugins"] = [*kwargs.get("plugins", []), DirectCheckpointIO()]
    try:
        return Fabric(accelerator=config.accelerator, devices=config.devices, loggers=loggers,
                      num_nodes=config.num_nodes, strategy=strategy, callbacks=callbacks, **kwargs)
    except (ValueError, RuntimeError, TypeError, ImportError) as exc:
        raise FastVAEError(f"cannot set up training hardware: {exc}") from None


def precision_kwargs(config: TrainConfig) -> dict:
    """Fabric's keyword for ``config.precision``: the name, except for fp16 on a CPU and for
    FSDP in fp16.

    On a CPU ``16-mixed`` runs as ``bf16-mixed`` (fp16 autocast needs CUDA; ``train``'s note
    says so: Fabric's own warning was several lines naming its source file). Fabric's FSDP2 strategy
    refuses the name ``16-mixed``, yet fp16 autocast with a GradScaler works on its sharded
    gradients (DTensor reduces GradScaler's found-inf flag over the ranks, so all skip an
    overflowing step together): it gets the plugin itself.
    """
    if config.precision != "16-mixed":
        return {"precision": config.precision}
    if fp16_runs_as_bf16(config):
        return {"precision": "bf16-mixed"}
    if config.strategy == "fsdp" and (config.accelerator in ("cuda", "gpu") or torch.cuda.is_available()):
        return {"plugins": [fp16_plugin("cuda")]}
    return {"precision": "16-mixed"}


def fp16_runs_as_bf16(config: TrainConfig) -> bool:
    """Whether ``--precision 16-mixed`` runs as bf16-mixed: on a CPU, where fp16 autocast does
    not run (``train`` notes it once); CUDA and Apple's MPS run fp16, as Fabric resolves them."""
    accelerator = config.accelerator
    mps = getattr(torch.backends, "mps", None)
    gpu = torch.cuda.is_available() or bool(mps and mps.is_available())
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not gpu)
    return config.precision == "16-mixed" and on_cpu


def fp16_plugin(device: str, init_scale: float = 2.0**16):
    """Fabric's fp16 mixed precision with a fresh GradScaler on ``device`` (torch's default
    first scale)."""
    from lightning_fabric.plugins import MixedPrecision

    return MixedPrecision("16-mixed", device, torch.amp.GradScaler(device, init_scale=init_scale))
