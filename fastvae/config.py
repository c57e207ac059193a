"""``TrainConfig``: every setting of a training run, validated, saved as ``config.json``.

A run is repeatable from its ``config.json`` alone (``fastvae train --config RUN/config.json``).
"""

from __future__ import annotations

import json
import math
import numbers
import os
import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from fastvae.errors import FastVAEError

PRECISIONS = ("32-true", "32", "64-true", "bf16-mixed", "16-mixed", "bf16-true")  # not 16-true: see validate
STRATEGIES = ("auto", "ddp", "ddp_spawn", "fsdp")  # not dp: see validate
# Fabric's names that fastvae refuses, with the reason (validate): taken by the command line, not offered
REFUSED = {"precision": ("16-true",), "strategy": ("dp",)}
ACCELERATORS = ("auto", "cpu", "cuda", "gpu", "mps")
# torch.compile modes; "reduce-overhead" and "max-autotune" replay the step as CUDA graphs
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

# The allowed values of every setting that has a fixed set: the CLI's choices, validation and
# fastvae.models (whose ARCHITECTURES are keyed by MODELS) all read them from here.
MODELS = ("mlp", "conv", "convkl")  # convkl: spatial latent (fastvae.models.convkl)
KINDS = ("vae", "ae")  # vae, or the deterministic MSE autoencoder baseline
LIKELIHOODS = ("bernoulli", "gaussian", "laplace")
DOWNSAMPLES = (2, 4, 8)  # convkl: image H x W -> latent H/f x W/f
REPARAM_BACKENDS = ("auto", "torch", "triton")
ON_NONFINITE = ("stop", "skip")
TRACKERS = ("csv", "tensorboard", "wandb", "mlflow")  # --logger: experiment trackers (fastvae.trackers)
MAX_WORKERS = 64  # --workers: DataLoader processes reading a streamed dataset
MAX_THREADS = 1024  # --threads: torch CPU threads per process
CHOICES = {
    "model": MODELS, "kind": KINDS, "likelihood": LIKELIHOODS, "precision": PRECISIONS,
    "strategy": STRATEGIES, "accelerator": ACCELERATORS, "reparam": REPARAM_BACKENDS,
    "on_nonfinite": ON_NONFINITE, "compile_mode": COMPILE_MODES, "downsample": DOWNSAMPLES,
}
# The settings of the spatial-latent model (--model convkl); the others ignore them.
CONVKL_SETTINGS = ("downsample", "latent_channels", "width", "channel_mult", "blocks_per_level",
                   "attention", "image_skip")
# Settings a model family does not read (left out where a run's settings are shown)
FLAT_ONLY_SETTINGS = ("latent_dim", "hidden_dim")  # the convkl model's latent is c x H/f x W/f


def unused_split_flags(test_fraction: float, split_seed: int) -> str | None:
    """"--test-fraction 0.3 changes nothing" for the split flags given other than their
    defaults (None: none): what a note says where the data has a test split of its own."""
    default = TrainConfig()
    given = [f"--{name.replace('_', '-')} {value}" for name, value in
             (("test_fraction", test_fraction), ("split_seed", split_seed)) if value != getattr(default, name)]
    if not given:
        return None
    return f"{' and '.join(given)} change{'s' if len(given) == 1 else ''} nothing"


def unused_settings(model: str) -> tuple[str, ...]:
    """The settings that do not apply to ``--model model``."""
    return FLAT_ONLY_SETTINGS if model == "convkl" else CONVKL_SETTINGS


# The settings that build the model: its spec (fastvae.models.build_model), stored in checkpoints.
MODEL_SETTINGS = ("model", "kind", "latent_dim", "hidden_dim", "likelihood", "sigma", "learn_sigma",
                  *CONVKL_SETTINGS)
# Settings a resumed run must share with the run that wrote the checkpoint (a learned or fixed
# sigma's value may change: it is a starting value).
RESUME_IDENTITY = ("model", "kind", "latent_dim", "hidden_dim", "likelihood", "learn_sigma", "data",
                   "test_fraction", "split_seed", "split_rule", "grayscale", *CONVKL_SETTINGS)
def resume_identity(saved: dict) -> tuple[str, ...]:
    """RESUME_IDENTITY less the settings the saved run's model does not read (an MLP's convkl
    settings, an autoencoder's likelihood): changing those changes nothing, so resumes them."""
    unused = set(unused_settings(saved.get("model", "mlp")))
    if saved.get("kind") == "ae":
        unused |= {"likelihood", "learn_sigma"}
    return tuple(k for k in RESUME_IDENTITY if k not in unused)


# What a saved config.json (or checkpoint) without a setting was made with, where that is not
# today's default: split_rule 2 came on 2026-11-30.
SAVED_BEFORE = {"split_rule": 1}
# The rules of what an in-memory source holds and which part is held out; runs record the one
# they were made with: 1 each label's share rounded alone; 2 (2026-11-30) the shares rounded
# together (fastvae.data.split_indices); 3 (2026-12-01) image folders also read .tif/.tiff/.jfif/
# .jpe/.apng/.ppm/.pgm/.pbm/.pnm and keep a train/ + val/ split (fastvae.data.folder_rule); 4
# (2026-12-01) train/ + test/ stay the split beside other folders (STL-10's unlabeled/), which
# rule 3 read as labels, training on the published test images.
MAX_FREE_BITS = 1e4  # nats per latent dim: far beyond any use; float32's range ends at 3.4e38
SPLIT_RULES = (1, 2, 3, 4)
SPLIT_RULE = 4


MAX_SEED = 2**32 - 1  # numpy's and Lightning's seeds are 32-bit unsigned
# ceilings of the size settings: far beyond any model this package trains, low enough that an
# extra digit is one line here, not an integer overflow inside torch or hours of building modules
SIZE_LIMITS = {"latent_dim": 1 << 20, "hidden_dim": 1 << 20, "latent_channels": 1 << 16, "width": 1 << 16,
               "blocks_per_level": 64, "batch_size": 1 << 24, "devices": 1 << 16, "num_nodes": 1 << 16}
MAX_IWAE_K = 1 << 20  # importance samples per example of the IWAE bound
MAX_CHANNEL_MULT = 64

def url_problem(text: str) -> "str | None":
    """Why ``text`` cannot be a place to write (it is a URL), or None."""
    scheme, sep, rest = text.partition("://")
    if not sep:
        return None
    if scheme.lower() == "file":
        return f"{text} is a URL: give the local path itself ({rest or '/'})"
    copy = {"s3": f"aws s3 sync FOLDER {text}", "gs": f"gsutil -m rsync -r FOLDER {text}"}.get(scheme.lower())
    return (f"{text} is a URL, and fastvae writes local files only: write into a local folder "
            f"(or a shared file system), then copy it there" + (f" (e.g. '{copy}')" if copy else ""))


@dataclass
class TrainConfig:
    """Settings of one run. Defaults are the digits protocol of the README."""

    data: str = "digits"
    model: str = "mlp"  # one of MODELS
    kind: str = "vae"  # one of KINDS
    latent_dim: int = 8
    hidden_dim: int = 512
    likelihood: str = "bernoulli"  # one of LIKELIHOODS
    sigma: float = 0.1  # gaussian likelihood scale (initial value when learn_sigma)
    learn_sigma: bool = False
    epochs: int = 50
    batch_size: int = 64  # per device; the global batch is batch_size * devices * num_nodes
    lr: float = 1e-3
    seed: int = 0
    out: str = "runs/run"
    beta: float = 1.0
    kl_warmup_steps: int = 0  # linear KL annealing from 0 to beta over this many steps
    free_bits: float = 0.0  # nats per latent dim; 0 disables
    precision: str = "32-true"
    accelerator: str = "auto"
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"
    compile: bool = False
    compile_mode: str = "default"  # a mode other than default implies compile
    reparam: str = "auto"  # auto (fused kernel on CUDA) | torch | triton
    on_nonfinite: str = "stop"  # stop | skip: what a NaN/Inf loss does
    iwae_k: int = 0  # >0: evaluate the IWAE bound with K samples after training
    # mid-epoch checkpoints, besides the one at each epoch's end (and at a stop request): what a
    # SIGKILL (a lost node, the OOM killer) costs at most. 0 turns either off
    checkpoint_every: int = 0  # optimization steps
    checkpoint_minutes: float = 30.0  # minutes since the last checkpoint (rank 0's clock)
    pictures: bool = True
    progress: bool = True
    tensorboard: bool = False  # also log metrics to RUN/tensorboard (= loggers "tensorboard")
    # data: the held-out split of sources without their own (fastvae.data.split_indices) and
    # colour of image folders; `fastvae prepare` stores its own in the prepared dataset
    test_fraction: float = 0.1
    split_seed: int = 0
    split_rule: int = SPLIT_RULE  # fastvae.data.split_indices' rule; a run keeps the one it was made with
    grayscale: bool = False
    workers: int = 2  # DataLoader processes reading a prepared (streamed) dataset; 0: none
    threads: int = 0  # torch CPU threads per process; 0: torch's (Fabric shares the cores among a node's processes)
    loggers: str = ""  # comma-separated TRACKERS that also receive the metrics
    # --model convkl (spatial latent c x H/f x W/f; fastvae.models.convkl)
    downsample: int = 4  # f, one of DOWNSAMPLES
    latent_channels: int = 4  # c
    width: int = 64  # channels of the first resolution level
    channel_mult: str = ""  # width multipliers per level (log2(f) + 1 of them), e.g. "1,2,2"; "" = 1,2,2,4 cut to fit
    blocks_per_level: int = 1  # ResNet blocks per resolution level (decoder: one more)
    attention: bool = False  # self-attention in the mid block (lowest resolution)
    image_skip: bool = True  # latent starts as the f-downsampled image, decoder output as its bicubic upsampling

    def validate(self) -> "TrainConfig":
        """Raise ``FastVAEError`` naming the first bad setting and what to use instead."""
        for f in fields(self):  # each setting of its field's type (TrainConfig(...) checks none)
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name), type(f.default), "TrainConfig"))
        positive = ("latent_dim", "hidden_dim", "epochs", "batch_size", "devices", "num_nodes",
                    "latent_channels", "width", "blocks_per_level")
        for name in positive:
            value = getattr(self, name)
            if value < 1:  # of its type: coerced above
                raise FastVAEError(f"--{flag_of(name)} must be a positive integer, got {value!r}")
            if value > SIZE_LIMITS.get(name, value):
                raise FastVAEError(f"--{flag_of(name)} {value} is beyond the largest this package takes "
                                   f"({SIZE_LIMITS[name]:,}): give a smaller value")
        if not self.data.strip():  # "" is the current folder to pathlib: not what was meant
            raise FastVAEError("--data is empty: name a dataset (digits, photos, a file or folder, "
                               "prepared shards)")
        if not self.out.strip():
            raise FastVAEError("--out is empty: name the run folder to write")
        check_iwae_k(self.iwae_k)
        for name in ("lr", "sigma", "beta", "free_bits", "test_fraction", "checkpoint_minutes"):
            value = getattr(self, name)
            if not math.isfinite(value):
                raise FastVAEError(f"--{flag_of(name)} must be a finite number, got {value!r}")
        checks = {
            "lr": self.lr > 0,
            "sigma": self.sigma > 0,
            "beta": self.beta >= 0,
            "free_bits": 0 <= self.free_bits <= MAX_FREE_BITS,
            "kl_warmup_steps": self.kl_warmup_steps >= 0,
            "checkpoint_every": self.checkpoint_every >= 0,
            "checkpoint_minutes": self.checkpoint_minutes >= 0,
            "test_fraction": 0 < self.test_fraction < 1,
        }
        if not checks["test_fraction"]:
            from fastvae.data import test_fraction_error

            raise test_fraction_error(self.test_fraction)
        for name, ok in checks.items():
            if not ok:
                sign = {"lr": "positive", "sigma": "positive", "checkpoint_every": "zero (off) or positive",
                        "checkpoint_minutes": "zero (off) or positive",
                        "free_bits": f"from 0 (off) to {MAX_FREE_BITS:g} nats per latent dim"}.get(name, "zero or positive")
                raise FastVAEError(f"--{flag_of(name)} must be {sign}, got {getattr(self, name)!r}")
        problem = url_problem(self.out)  # a config file's out: what the --out flag's type refuses
        if problem:
            raise FastVAEError(f"--out: {problem}")
        if self.split_rule not in SPLIT_RULES:
            raise FastVAEError(f"split_rule must be one of {SPLIT_RULES} ({SPLIT_RULE}: today's rule), "
                               f"got {self.split_rule!r}")
        for name in ("seed", "split_seed"):
            check_seed(getattr(self, name), f"--{flag_of(name)}")
        if self.learn_sigma and self.likelihood == "bernoulli":
            raise FastVAEError("--learn-sigma needs a gaussian or laplace --likelihood (bernoulli has no sigma)")
        if self.kind == "ae":  # settings of the ELBO, which a deterministic autoencoder has not
            vae_only = {"beta": self.beta != 1.0, "free_bits": self.free_bits != 0.0,
                        "kl_warmup_steps": self.kl_warmup_steps != 0, "learn_sigma": self.learn_sigma,
                        "iwae_k": self.iwae_k != 0}
            for name, given in vae_only.items():
                if given:
                    raise FastVAEError(f"--{flag_of(name)} {getattr(self, name)} belongs to a VAE's ELBO, which "
                                       f"--kind ae (an MSE autoencoder) does not have: drop it or train --kind vae")
        if self.compile_mode != "default":  # a mode compiles: config.json says so
            self.compile = True
        if not 0 <= self.threads <= MAX_THREADS:
            raise FastVAEError(f"--threads must be an integer from 0 (torch's default) to {MAX_THREADS}, "
                               f"got {self.threads!r}")
        if not 0 <= self.workers <= MAX_WORKERS:
            raise FastVAEError(f"--workers must be an integer from 0 (read in the training process) "
                               f"to {MAX_WORKERS}, got {self.workers!r}")
        for name in self.logger_names():
            if name not in TRACKERS:
                raise FastVAEError(f"--logger {name!r} is not supported: use one or more of "
                                   + ", ".join(TRACKERS))
            if name in ("wandb", "mlflow") and self.strategy == "ddp_spawn":
                # its run is open in the launching process, which spawned ranks cannot take over
                raise FastVAEError(f"--logger {name} does not work with --strategy ddp_spawn: use --strategy "
                                   f"ddp (or auto), whose ranks start as processes of their own")
        if self.precision == "16-true":  # Fabric's: weights and Adam's moments in float16
            raise FastVAEError("--precision 16-true is not supported: it keeps Adam's moments in float16, where "
                               "small gradients' squares underflow to 0 and the steps blow up (a digits run ended "
                               "at test -ELBO 262 against 37 in 32-true); use 16-mixed (float16 autocast, float32 "
                               "weights) or bf16-true")
        if self.strategy == "dp":
            raise FastVAEError("--strategy dp (DataParallel: one process drives every device) is not supported: use "
                               "ddp, one process per device (faster; on a CPU Lightning ran dp as ddp anyway)")
        if self.strategy == "fsdp" and self.precision == "64-true":
            raise FastVAEError("--strategy fsdp does not take --precision 64-true (Lightning's FSDP has no float64 "
                               "mode): use --strategy ddp for float64, or another --precision")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise FastVAEError(
                    f"--{flag_of(name)} {getattr(self, name)!r} is not supported: use one of "
                    + ", ".join(map(str, allowed))
                )
        parse_channel_mult(self.channel_mult, self.downsample)
        return self

    def logger_names(self) -> list[str]:
        """The experiment trackers to log to (``loggers``, plus ``tensorboard`` for the flag)."""
        names = [n.strip() for n in self.loggers.split(",") if n.strip()]
        if self.tensorboard and "tensorboard" not in names:
            names.append("tensorboard")
        return list(dict.fromkeys(names))

    @property
    def compiled(self) -> bool:
        """Whether the training step is compiled (``--compile`` or a ``--compile-mode``)."""
        return self.compile or self.compile_mode != "default"

    def to_dict(self) -> dict:
        return asdict(self)

    def model_spec(self, data_shape: tuple[int, ...]) -> dict:
        """The plain dict ``fastvae.models.build_model`` takes."""
        return {"data_shape": list(data_shape), **{k: getattr(self, k) for k in MODEL_SETTINGS}}

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> "TrainConfig":
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            hints = [f"{name}: did you mean {closest_setting(name, known)}?" for name in unknown
                     if closest_setting(name, known)]
            raise FastVAEError(
                f"{source}: unknown setting(s) {', '.join(unknown)}"
                + (f" ({'; '.join(hints)})" if hints else "")
                + "; known settings are " + ", ".join(known)
            )
        typed = {}
        for name, value in values.items():
            typed[name] = _coerce(name, value, type(getattr(cls(), name)), source)
        return cls(**typed)


def saved_settings(values: dict) -> dict:
    """A run's saved settings (config.json or a checkpoint's), with what the settings it lacks
    were when it was made (``SAVED_BEFORE``): an older run keeps its held-out split."""
    return {**SAVED_BEFORE, **values}


def host_memory(cgroup_root: str = "/sys/fs/cgroup", cgroup_file: str = "/proc/self/cgroup") -> int:
    """The memory this process may use in bytes: the machine's physical memory, or a container's
    cgroup limit where it is lower (Kubernetes, Docker --memory, SLURM's cgroups: beyond it the
    kernel's OOM killer ends the process with no message); 0 where the system does not say (no
    check)."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX
        physical = 0
    limit = _cgroup_memory_limit(cgroup_root, cgroup_file)
    return min(physical, limit) if physical and limit else physical or limit


def available_memory(meminfo: str = "/proc/meminfo", cgroup_root: str = "/sys/fs/cgroup",
                     cgroup_file: str = "/proc/self/cgroup") -> int:
    """The memory that can be allocated now, in bytes: the system's MemAvailable (free memory
    and what the kernel can reclaim), and in a container or job cgroup at most its limit less
    what it uses already (the host may have memory free that the cgroup may not take); 0 where
    the system says neither (no check)."""
    rooms = [limit - used for limit, used in _cgroup_memory(cgroup_root, cgroup_file) if used is not None]
    try:
        with open(meminfo) as file:
            free = next(int(line.split()[1]) for line in file if line.startswith("MemAvailable:")) * 1024
    except (OSError, StopIteration, ValueError, IndexError):
        free = host_memory(cgroup_root, cgroup_file)
    rooms += [free] if free else []
    return max(1, min(rooms)) if rooms else 0  # 1: a cgroup at its limit has no room (0 would mean unknown)


def _cgroup_memory_limit(root: str, cgroup_file: str) -> int:
    """The lowest memory limit of this process's cgroup and its ancestors (cgroup v2's
    memory.max, v1's memory.limit_in_bytes; a container sees its own as the root, a SLURM job or
    systemd scope a path below it), else 0 ("max", or v1's ~2**63)."""
    return min((limit for limit, _ in _cgroup_memory(root, cgroup_file)), default=0)


def _cgroup_memory(root: str, cgroup_file: str) -> list[tuple[int, int | None]]:
    """(limit, usage or None) of each level of this process's cgroup that has a memory limit."""
    found = []
    for folder, v2 in _cgroup_folders(root, cgroup_file, "memory"):
        limit = _read_int(os.path.join(folder, "memory.max" if v2 else "memory.limit_in_bytes"))
        if limit is not None and 0 < limit < 2**60:
            found.append((limit, _read_int(os.path.join(folder, "memory.current" if v2 else "memory.usage_in_bytes"))))
    return found


def _read_text(path: str) -> str | None:
    """A small system file's text, stripped; None where it cannot be read."""
    try:
        with open(path) as file:
            return file.read().strip()
    except OSError:
        return None


def _read_int(path: str) -> int | None:
    text = _read_text(path)
    return int(text) if text is not None and text.isdigit() else None


def _cgroup_folders(root: str, cgroup_file: str, controller: str) -> list[tuple[str, bool]]:
    """(folder, is cgroup v2) of this process's cgroup and each ancestor up to the root, for
    ``controller`` (``cgroup_file`` names the cgroups: /proc/self/cgroup)."""
    try:
        lines = open(cgroup_file).read().splitlines()
    except OSError:
        lines = []
    places = []  # (folder of the hierarchy's root, the cgroup's path in it, v2)
    for line in lines:
        hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if hierarchy == "0" and not controllers:
            places.append((root, path, True))
        elif controller in controllers.split(","):
            places.append((os.path.join(root, controllers), path, False))
    if not places:  # no /proc: the root's own files, as a container sees them
        places = [(root, "/", True), (os.path.join(root, controller), "/", False)]
    folders = []
    for base, path, v2 in places:
        parts = [part for part in path.split("/") if part and part != ".."]
        folders += [(os.path.join(base, *parts[:depth]), v2) for depth in range(len(parts), -1, -1)]
    return folders


def usable_cpus(cgroup_root: str = "/sys/fs/cgroup", cgroup_file: str = "/proc/self/cgroup") -> int:
    """The CPUs this process may use: those of its affinity mask (taskset, a SLURM job's or a
    Kubernetes pod's cpuset), fewer where a cgroup v2 CPU quota (cpu.max: Docker --cpus,
    Kubernetes limits) allows less time (rounded up); os.cpu_count() counts the machine's."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    for folder, v2 in _cgroup_folders(cgroup_root, cgroup_file, "cpu"):
        text = _read_text(os.path.join(folder, "cpu.max")) if v2 else None  # v1's quota: not read
        quota, _, period = (text or "").partition(" ")
        if quota.isdigit() and period.isdigit() and int(period) > 0:
            cpus = min(cpus, max(1, -(-int(quota) // int(period))))
    return max(1, cpus)


def check_seed(seed, name: str = "--seed") -> int:
    """``seed`` as an int if numpy, Lightning and torch all take it (0 to 2**32 - 1), else
    FastVAEError naming ``name``."""
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
        raise FastVAEError(f"{name} must be an integer from 0 to {MAX_SEED}, got {seed!r}")
    return int(seed)


def check_iwae_k(k, name: str = "--iwae-k") -> int:
    """``k`` as an int if it is a valid number of importance samples (0: no IWAE bound), else
    FastVAEError naming ``name``."""
    if not isinstance(k, numbers.Integral) or isinstance(k, bool) or not 0 <= k <= MAX_IWAE_K:
        raise FastVAEError(f"{name} must be an integer from 0 (no IWAE bound) to {MAX_IWAE_K:,}, got {k!r}")
    return int(k)


def parse_channel_mult(text: str, downsample: int) -> tuple[int, ...]:
    """``--channel-mult`` "1,2,2" -> (1, 2, 2): one positive multiplier per resolution level of
    the convkl model, log2(f) + 1 levels; "" takes (1, 2, 2, 4) cut to that length."""
    levels = int(downsample).bit_length()  # f = 2, 4, 8 -> 2, 3, 4 levels
    if not str(text).strip():
        return (1, 2, 2, 4)[:levels]
    try:
        mult = tuple(int(part) for part in str(text).split(","))
    except ValueError:
        mult = ()
    if len(mult) != levels or min(mult) < 1 or max(mult) > MAX_CHANNEL_MULT:
        raise FastVAEError(
            f"--channel-mult {text!r} must be {levels} integers from 1 to {MAX_CHANNEL_MULT} separated by commas "
            f"(one per resolution level of --downsample {downsample}), e.g. "
            + ",".join(map(str, (1, 2, 2, 4)[:levels]))
        )
    return mult


def load_config_file(path: str | Path) -> dict:
    """Read a JSON or TOML config file into a dict, with one clear error for each problem."""
    if not str(path).strip():
        raise FastVAEError("--config is empty: give a .json or .toml file")
    path = Path(path).expanduser()
    if not path.is_file():
        what = ("is a folder" if path.is_dir() else "is not a regular file" if path.exists()
                else "does not exist")
        raise FastVAEError(f"config file {path} {what}: give a .json or .toml file")
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        raise FastVAEError(f"config file {path}: YAML is not read; give the settings as .json or .toml")
    # .toml is TOML and .json JSON; another name is read as either, whichever it is
    readers = {".toml": [("TOML", tomllib.loads)], ".json": [("JSON", json.loads)]}.get(
        suffix, [("JSON", json.loads), ("TOML", tomllib.loads)])
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise FastVAEError(f"config file {path} could not be read: {exc}") from None
    problems = []
    for kind, parse in readers:
        try:
            values = parse(text)
            break
        except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
            problems.append(f"as {kind}: {exc}" if len(readers) > 1 else str(exc))
    else:
        raise FastVAEError(f"config file {path} could not be read ({'; '.join(problems)})") from None
    if not isinstance(values, dict):
        raise FastVAEError(f"config file {path} must hold one object of settings, not {type(values).__name__}")
    for key in ("data", "out"):  # ~ as a shell expands it on the command line (else a folder named ~)
        if isinstance(values.get(key), str) and values[key].startswith("~"):
            values[key] = os.path.expanduser(values[key])
    return values


# config keys people write for a flag whose setting has another name
FLAG_SETTINGS = {"logger": "loggers", "quiet": "progress = false", "no_pictures": "pictures = false",
                 "no_quiet": "progress = true"}


def setting_of_flag(flag: str) -> str:
    """The TrainConfig field a flag named in a message sets: ``--latent-dim`` -> ``latent_dim``,
    ``--logger`` -> ``loggers`` (FLAG_SETTINGS' renamed fields; its value settings stay as named)."""
    name = flag.removeprefix("--").replace("-", "_")
    setting = FLAG_SETTINGS.get(name, name)
    return setting if setting.isidentifier() else name


# what a program passes for a flag that is no setting: train()'s own keywords, the switches' values
_FLAG_KEYWORDS = {"resume": "resume=True", "overwrite": "overwrite=True", "quiet": "progress=False",
                  "no_quiet": "progress=True", "no_pictures": "pictures=False"}


def keyword_spelling(message: str) -> str:
    """A message as a program wrote the settings: ``--latent-dim`` as ``latent_dim``,
    ``--logger`` as ``loggers`` (TrainConfig's field names), ``--resume`` as ``resume=True``.
    A command to run (in backticks, or quoted: 'fastvae ...') stays as written."""
    import re

    def keyword(match: re.Match) -> str:
        flag, placeholder = match.groups()
        name = flag.removeprefix("--").replace("-", "_")
        spelled = _FLAG_KEYWORDS.get(name) or setting_of_flag(flag)
        return f"{spelled}={placeholder}" if placeholder else spelled  # --data NEWPATH: data=NEWPATH

    # commands to run, in backticks or quoted ('fastvae prepare SRC --out SHARDS'), keep their flags
    parts = re.split(r"(`[^`]*`|'fastvae [^']*')", message)
    parts[::2] = [re.sub(r"(?<![\w-])(--[a-z][a-z0-9-]*)(?: ([A-Z][A-Z_]+)\b)?", keyword, part)
                  for part in parts[::2]]
    return "".join(parts)


def closest_setting(name: str, known) -> str | None:
    """The setting a mistyped or flag-spelled config key means (latent-dim, latnet_dim:
    latent_dim; logger: loggers), or None."""
    import difflib

    key = str(name).strip().lstrip("-").replace("-", "_")
    if key in known:
        return key
    if key in FLAG_SETTINGS:
        return FLAG_SETTINGS[key]
    match = difflib.get_close_matches(key, list(known), n=1, cutoff=0.75)
    return match[0] if match else None


def _coerce(name: str, value, kind: type, source: str):
    """``value`` as the setting's type: numpy numbers become Python ones, paths strings; a
    switch takes only True or False (a string "no" would read as True)."""
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
    elif kind is float:
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:  # a 400-digit integer: beyond any float
                raise FastVAEError(f"{source}: setting {name!r} must be a finite number, got an integer of "
                                   f"{len(str(abs(int(value))))} digits") from None
    elif kind is str:
        if isinstance(value, (str, os.PathLike)):
            return os.fspath(value)
        if name == "channel_mult" and isinstance(value, (list, tuple)) and all(  # TOML/JSON [1, 2, 2]
                isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value):
            return ",".join(str(int(v)) for v in value)
    words = KIND_WORDS[kind]
    if kind is bool and source != "TrainConfig":  # a config file: JSON and TOML spell them so
        words = "true or false"
    raise FastVAEError(f"{source}: setting {name!r} must be {words}, got {value!r}")


KIND_WORDS = {bool: "True or False", int: "an integer", float: "a number", str: "a string"}


def flag_of(name: str) -> str:
    """The command-line spelling of a setting's name, without the dashes: ``latent_dim`` ->
    ``latent-dim``."""
    return name.replace("_", "-")
