"""The process layout a run asks for, checked before anything starts: several nodes need a
launcher, a launcher's process count must be the run's --devices x --num-nodes, and a CPU runs
no more training processes than it has cores."""

from __future__ import annotations

import os

import torch

from fastvae.config import TrainConfig, usable_cpus
from fastvae.errors import FastVAEError


def check_processes(config: TrainConfig) -> None:
    """Refuse process layouts that cannot start: several nodes without a launcher that tells
    each its rank and the rendezvous address (Fabric would wait 30 minutes for nodes that never
    come, deaf to Ctrl-C), --devices/--num-nodes other than the processes torchrun or srun
    started (each process would train alone, or fewer devices than asked), and more CPU
    processes than cores."""
    if config.num_nodes > 1 and not _launched_on_nodes():
        raise FastVAEError(
            f"--num-nodes {config.num_nodes} needs a multi-node launcher that starts fastvae on every "
            "node (torchrun, srun under SLURM, ...) or MASTER_ADDR, MASTER_PORT and NODE_RANK in the "
            "environment: see the README's cluster recipe")
    launched = _launcher_layout()
    if launched is not None:
        name, per_node, nodes = launched
        if (per_node, nodes) != (config.devices, config.num_nodes):
            # else Fabric runs every process alone (all writing one run folder) or waits for
            # ranks that never start
            raise FastVAEError(
                f"{name} started {per_node} process{'es' if per_node > 1 else ''} per node on {nodes} "
                f"node{'s' if nodes > 1 else ''}, and each is one rank: give --devices {per_node} --num-nodes "
                f"{nodes} (not --devices {config.devices} --num-nodes {config.num_nodes})")
    on_cpu = config.accelerator == "cpu" or (config.accelerator == "auto" and not torch.cuda.is_available())
    cores = usable_cpus()
    if on_cpu and config.devices > cores:
        raise FastVAEError(f"--devices {config.devices} on a CPU starts {config.devices} training processes, "
                           f"but this process may use {cores} cores: use --devices {cores} or fewer")


def _launched_on_nodes() -> bool:
    from lightning_fabric.plugins.environments import LSFEnvironment, SLURMEnvironment, TorchElasticEnvironment

    env = os.environ
    if env.get("MASTER_ADDR") and env.get("MASTER_PORT") and (env.get("NODE_RANK") or env.get("RANK")):
        return True  # set by hand, or by Kubeflow's PyTorchJob
    launchers = (TorchElasticEnvironment, SLURMEnvironment, LSFEnvironment)
    return any(launcher.detect() for launcher in launchers) or "OMPI_COMM_WORLD_SIZE" in env


def _launcher_layout() -> tuple[str, int, int] | None:
    """(launcher, processes per node, nodes) where torchrun or srun started this process (the
    environments Fabric reads, in its order), else None: Fabric starts the processes itself, or
    the layout is left to Fabric's own checks (a SLURM allocation without a job step, as in an
    sbatch script or an salloc shell that did not srun fastvae; srun without --ntasks-per-node,
    which Fabric refuses itself)."""
    from lightning_fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    env = os.environ
    try:
        if TorchElasticEnvironment.detect():
            world, per_node = int(env["WORLD_SIZE"]), int(env["LOCAL_WORLD_SIZE"])
            return "torchrun", per_node, max(1, world // max(1, per_node))
        srun = "SLURM_STEP_ID" in env or "SLURM_STEPID" in env  # set for srun's tasks only
        if srun and SLURMEnvironment.detect() and "SLURM_NTASKS_PER_NODE" in env:
            return "srun", int(env["SLURM_NTASKS_PER_NODE"]), int(env.get("SLURM_NNODES", "1"))
    except (KeyError, ValueError):  # a value that is not a number: left to Fabric
        return None
    return None
