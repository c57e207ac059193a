"""``fastvae train``: train a VAE into a run folder."""

from __future__ import annotations

import argparse

from fastvae.commands import arg_types

HELP = "train a VAE (or the MSE autoencoder baseline) into a run folder"
DESCRIPTION = (
    "Train a VAE on the bundled 8x8 digits or your own data, writing config.json, metrics.csv, "
    "checkpoints/last.ckpt and pictures into --out. Settings come from the defaults, then "
    "--config FILE, then the flags you give. With --resume, the run's own config.json is the base."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fastvae.config import CHOICES, REFUSED, TrainConfig

    d = TrainConfig()
    a = parser.add_argument_group("data and model")
    a.add_argument("--data", help=f"'digits' (bundled), 'photos' / 'photos:64' (bundled colour photo crops, "
                   f"32x32 / 64x64) or a path: MNIST IDX file or folder, .npy/.npz, a folder of images, or a "
                   f"dataset written by 'fastvae prepare' (a folder or an s3:// / gs:// URL; streamed) "
                   f"(default {d.data})")
    a.add_argument("--test-fraction", type=float, help="held-out share of data without a split of "
                   f"its own: seeded, stratified by label (default {d.test_fraction})")
    a.add_argument("--split-seed", type=arg_types.seed, help=f"seed of that held-out split (default {d.split_seed})")
    a.add_argument("--grayscale", action=argparse.BooleanOptionalAction, default=None,
                   help="convert colour images (a folder, photos, .npy/.npz) to one channel (default off: colour "
                   "is kept); a prepared colour dataset is refused: prepare it with --grayscale")
    a.add_argument("--workers", type=int, help="DataLoader processes reading a prepared dataset "
                   f"(0: read in the training process) (default {d.workers})")
    a.add_argument("--model", choices=CHOICES["model"], help=f"encoder/decoder family (default {d.model})")
    a.add_argument("--kind", choices=CHOICES["kind"], help="vae, or ae: the deterministic autoencoder "
                   f"baseline trained with MSE (default {d.kind})")
    a.add_argument("--latent-dim", type=int, help=f"size of z (default {d.latent_dim})")
    a.add_argument("--hidden-dim", type=int, help=f"hidden layer width (default {d.hidden_dim})")
    a.add_argument("--likelihood", choices=CHOICES["likelihood"],
                   help=f"p(x|z): bernoulli (BCE on [0,1] pixels), gaussian or laplace (L1) (default {d.likelihood})")
    a.add_argument("--sigma", type=float, help=f"gaussian / laplace likelihood scale (default {d.sigma})")
    a.add_argument("--learn-sigma", action=argparse.BooleanOptionalAction, default=None,
                   help="learn the gaussian / laplace scale (default off)")
    k = parser.add_argument_group("spatial latent (--model convkl): image C x H x W -> latent c x H/f x W/f")
    k.add_argument("--downsample", type=int, choices=CHOICES["downsample"], help=f"f (default {d.downsample})")
    k.add_argument("--latent-channels", type=int, help=f"c (default {d.latent_channels})")
    k.add_argument("--width", type=int, help=f"channels of the first resolution level (default {d.width})")
    k.add_argument("--channel-mult", help="width multipliers per resolution level, log2(f) + 1 of them, "
                   "e.g. 1,2,2 (default: 1,2,2,4 cut to fit)")
    k.add_argument("--blocks-per-level", type=int, help=f"ResNet blocks per level (default {d.blocks_per_level})")
    k.add_argument("--attention", action=argparse.BooleanOptionalAction, default=None,
                   help="self-attention in the lowest-resolution mid block (default off)")
    k.add_argument("--image-skip", action=argparse.BooleanOptionalAction, default=None,
                   help="start from the bicubic codec: the latent begins as the downsampled image and "
                   "the decoder as its bicubic upsampling, both refined by training (default on)")
    o = parser.add_argument_group("optimization")
    o.add_argument("--epochs", type=int, help=f"passes over the training split (default {d.epochs})")
    o.add_argument("--batch-size", type=int, help=f"examples per step per device (default {d.batch_size})")
    o.add_argument("--lr", type=float, help=f"Adam learning rate (default {d.lr})")
    o.add_argument("--seed", type=arg_types.seed, help=f"random seed for weights, shuffling and noise (default {d.seed})")
    o.add_argument("--beta", type=float, help=f"weight of the KL term, beta-VAE (default {d.beta})")
    o.add_argument("--kl-warmup-steps", type=int,
                   help=f"anneal the KL weight linearly from 0 to beta over N steps (default {d.kl_warmup_steps})")
    o.add_argument("--free-bits", type=float, help=f"free bits in nats per latent dim, 0 = off (default {d.free_bits})")
    o.add_argument("--on-nonfinite", choices=CHOICES["on_nonfinite"],
                   help="on a NaN/Inf loss or gradient, stop (keeping the last checkpoint) or skip the "
                        f"step (default {d.on_nonfinite})")
    h = parser.add_argument_group("hardware (passed to Lightning Fabric)")
    h.add_argument("--accelerator", choices=CHOICES["accelerator"], help=f"(default {d.accelerator})")
    h.add_argument("--devices", type=int, help=f"devices (processes) per node (default {d.devices})")
    h.add_argument("--num-nodes", type=int, help=f"number of machines (default {d.num_nodes})")
    # Fabric's names fastvae refuses (config.REFUSED) pass argparse: validate says why in one line
    h.add_argument("--strategy", choices=CHOICES["strategy"] + REFUSED["strategy"], metavar=_braced("strategy"),
                   help=f"ddp replicates the model, fsdp shards it (FSDP2) (default {d.strategy})")
    h.add_argument("--precision", choices=CHOICES["precision"] + REFUSED["precision"], metavar=_braced("precision"),
                   help=f"bf16-mixed is the fast choice on GPUs; 16-mixed scales the loss (default {d.precision})")
    h.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the training step (default off)")
    h.add_argument("--compile-mode", choices=CHOICES["compile_mode"],
                   help="torch.compile mode; reduce-overhead replays each step as a CUDA graph "
                   "(fewer kernel launches: the fastest on a GPU for small models); implies "
                   "--compile. Default: torch.compile's default mode")
    h.add_argument("--threads", type=int,
                   help="torch CPU threads per process (0: torch's default, the cores shared out among "
                   "a node's processes). On a CPU shared with other work give the cores that are free: "
                   "two threads on two cores with one of them busy made steps 2-8x slower (default 0)")
    h.add_argument("--reparam", choices=CHOICES["reparam"],
                   help="reparameterize+KL: fused Triton kernel on CUDA (auto), or force one (default auto)")
    r = parser.add_argument_group("run folder")
    r.add_argument("--out", type=arg_types.path, help=f"run folder to write (default {d.out})")
    r.add_argument("--config", metavar="FILE", help="JSON or TOML file of settings (keys as in config.json)")
    r.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    r.add_argument("--overwrite", action="store_true",
                   help="replace a run already in --out: what it wrote there (checkpoints, metrics, "
                   "pictures, report, exported decoder/encoder, tracker logs) is removed; other files stay")
    r.add_argument("--checkpoint-every", type=int, metavar="STEPS",
                   help="also write the checkpoint every STEPS optimization steps, mid-epoch "
                   f"(0 = off) (default {d.checkpoint_every})")
    r.add_argument("--checkpoint-minutes", type=float, metavar="MINUTES",
                   help="also write it once MINUTES have passed since the last one, mid-epoch: "
                   "the most work a SIGKILL (a lost node, the OOM killer) can cost (0 = off) "
                   f"(default {d.checkpoint_minutes:g})")
    r.add_argument("--iwae-k", type=int, help="after training, evaluate the IWAE bound with K samples (0 = skip)")
    r.add_argument("--no-pictures", dest="pictures", action="store_false", default=None,
                   help="do not write PNG pictures")
    r.add_argument("--pictures", dest="pictures", action="store_true", default=None,
                   help="write them (the default; undoes a run's --no-pictures on --resume)")
    r.add_argument("--logger", dest="logger_list", action="append", default=None, metavar="NAME",
                   help="also log metrics to an experiment tracker (repeatable): csv (RUN/csv), "
                   "tensorboard (RUN/tensorboard), wandb (offline: RUN/wandb), mlflow (RUN/mlflow.db, or RUN/mlruns without SQLAlchemy)")
    r.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=None,
                   help="same as --logger tensorboard (needs 'pip install tensorboard')")
    r.add_argument("--quiet", dest="progress", action="store_false", default=None,
                   help="no progress bar or per-epoch lines (nor Lightning's info lines)")
    r.add_argument("--no-quiet", dest="progress", action="store_true", default=None,
                   help="progress bar and per-epoch lines (the default; undoes a run's --quiet on --resume)")
    r.add_argument("--callback", dest="callbacks", action="append", default=[], metavar="MODULE:NAME",
                   help="a Fabric callback to call during training (repeatable): an object, or a "
                   "class made with no arguments; see fastvae.trainer for its hooks")


def run(args: argparse.Namespace) -> int:
    from dataclasses import fields
    from pathlib import Path

    from fastvae import run_folder
    from fastvae.config import TrainConfig, load_config_file, resume_identity, saved_settings
    from fastvae.errors import FastVAEError

    names = [f.name for f in fields(TrainConfig)]
    given = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    values: dict = {}
    from_file = load_config_file(args.config) if args.config is not None else {}  # read once
    values.update(from_file)
    if args.resume:
        out = Path(given.get("out") or values.get("out") or TrainConfig().out)
        if not (out / run_folder.CONFIG_JSON).is_file() and not (out / run_folder.LAST).is_file():
            raise FastVAEError(f"cannot resume: {out} holds neither {run_folder.CONFIG_JSON} nor "
                               f"{run_folder.LAST}; train into {out} first")
        saved = saved_settings(run_folder.read_run_config(out))
        _check_saved(saved, out)
        _machine_threads(saved, given)
        values = {**saved, **values}  # a deleted config.json: the checkpoint's
    if args.compile is False and args.compile_mode not in (None, "default"):
        raise FastVAEError(f"--no-compile contradicts --compile-mode {args.compile_mode} (which compiles): "
                           "give one of them")
    file_says_no = False  # a config file's compile = false, not overruled by a flag
    if args.config is not None and args.compile is None and args.compile_mode is None:
        file_says_no = from_file.get("compile") is False
        if file_says_no and from_file.get("compile_mode", "default") != "default":
            raise FastVAEError(f"{args.config}: compile = false contradicts compile_mode = "
                               f"{from_file['compile_mode']!r} (which compiles): give one of them")
    values.update(given)
    if (args.compile is False and args.compile_mode is None) or file_says_no:
        values["compile_mode"] = "default"  # no compiling: it wins over the resumed run's mode
    if args.logger_list:  # --logger csv --logger wandb (or --logger csv,wandb)
        trackers = ",".join([values.get("loggers", ""), *args.logger_list]).split(",")  # a resume's own first
        values["loggers"] = ",".join(dict.fromkeys(t.strip() for t in trackers if t.strip()))
    config = TrainConfig.from_dict(values, source=args.config or "settings")
    try:
        config.validate()
    except FastVAEError as exc:
        if args.resume:  # a changed model setting that no longer fits the run's others: name it
            from fastvae.data import absolute_source

            asked = config.to_dict()
            asked["data"] = absolute_source(asked["data"])  # as the run saved it
            before = TrainConfig.from_dict(saved, source=str(out)).to_dict()
            run_folder.check_resume(out, before, asked, resume_identity(before), mid_epoch=False,
                                    saved_world_size=1, world_size=1)
        if args.config and any(k in from_file and k not in given for k in _named(str(exc))):
            raise FastVAEError(f"{args.config}: {exc}") from None
        named = _named(str(exc))
        if (args.resume and not any(k in given for k in named)  # a flag given now is the one to change
                and any(k in saved and k not in from_file for k in named)):
            where = out / run_folder.CONFIG_JSON  # a value the run saved (edited, or older than today's rules)
            where = where if where.is_file() else out / run_folder.LAST
            raise FastVAEError(f"{where}: {exc} (the run's saved value: give the flag with a valid one, "
                               f"or repair {where.name})") from None
        raise
    from fastvae.data import absolute_source, note_shadowed_folder

    note_shadowed_folder(config.data)
    _note_unread_settings(config, given)
    config.data = absolute_source(config.data)  # config.json works from any folder

    from fastvae.trainer import command_line_train

    callbacks = [load_callback(name) for name in args.callbacks]
    result = command_line_train(config, resume=args.resume, overwrite=args.overwrite, callbacks=callbacks)
    if result is None:  # not global rank 0
        return 0
    if result.interrupted:
        return 130
    last = result.metrics[-1] if result.metrics else {}
    summary = {"run": str(result.run_dir), "epochs": result.epochs, "steps": result.steps,
               **{k: v for k, v in last.items() if k.startswith(("train_", "test_"))}}
    if config.iwae_k > 0:
        from fastvae.checkpoint import load
        from fastvae.evaluation import evaluate
        from fastvae.trainer import load_config_data

        from fastvae.data import data_grid

        data = load_config_data(config)
        summary.update({f"test_{k}": v for k, v in evaluate(
            load(result.run_dir), data.test, iwae_k=config.iwae_k, seed=config.seed, progress=config.progress,
            pixel_grid=data_grid(data)).items()})
    from fastvae.commands.json_output import json_line

    print(json_line(summary))
    return 0


def _check_saved(saved: dict, out) -> None:
    """One line naming the run's config.json (or checkpoint) when a setting saved in it is
    unknown or of the wrong type (edited by hand): the message blamed "settings"."""
    from pathlib import Path

    from fastvae import run_folder
    from fastvae.config import TrainConfig
    from fastvae.errors import FastVAEError

    where = Path(out) / run_folder.CONFIG_JSON
    if not where.is_file():  # read from the checkpoint (config.json deleted)
        where = Path(out) / run_folder.LAST
    try:  # unknown keys and wrong types: the file's own fault (values are checked once merged)
        TrainConfig.from_dict(saved, source=str(where))
    except FastVAEError as exc:
        remedy = ("repair it, or delete it to resume with the checkpoint's settings"
                  if where.name == run_folder.CONFIG_JSON else "train into a new --out")
        raise FastVAEError(f"{exc} ({remedy})") from None


def _note_unread_settings(config, given: dict) -> None:
    """One note naming the flags given on the command line that the chosen model does not read
    (an MLP's --downsample, convkl's --latent-dim): they change nothing, and said nothing."""
    import sys

    from fastvae.config import unused_settings
    from fastvae.trainer import _first_process

    unread = [f"--{k.replace('_', '-')}" for k in unused_settings(config.model) if k in given]
    if unread and _first_process():
        why = ("its latent is --latent-channels x H/f x W/f, its size --width" if config.model == "convkl"
               else "they are --model convkl settings")
        print(f"note: {' and '.join(unread)} change{'s' if len(unread) == 1 else ''} nothing for --model "
              f"{config.model} ({why})", file=sys.stderr)


def _named(message: str) -> list[str]:
    """Settings named as --flags in an error message, as config keys (--logger: loggers)."""
    from fastvae.config import setting_of_flag

    return [setting_of_flag(w) for w in message.split() if w.startswith("--")]


def load_callback(name: str):
    """``MODULE:NAME`` -> the object it names (a class is made with no arguments)."""
    import importlib

    from fastvae.errors import FastVAEError, one_line

    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise FastVAEError(f"--callback {name!r}: give MODULE:NAME, e.g. mypackage.callbacks:EarlyStop")
    try:
        target = getattr(importlib.import_module(module_name), attr)
    except Exception as exc:  # noqa: BLE001 - any error of the user's module (syntax, its own raise)
        raise FastVAEError(f"--callback {name!r} could not be loaded ({type(exc).__name__}: {one_line(exc)}): "
                           f"check that {module_name} is importable (PYTHONPATH) and defines {attr}") from None
    if not isinstance(target, type):
        return target
    try:
        return target()
    except Exception as exc:  # noqa: BLE001
        raise FastVAEError(f"--callback {name!r}: {attr}() failed ({type(exc).__name__}: {one_line(exc)}): "
                           "a callback class must be made with no arguments") from None


def _machine_threads(saved: dict, given: dict) -> None:
    """A resume keeps the run's --threads (the same kernels: the uninterrupted run's exact
    numbers) where this machine has that many cores; elsewhere torch chooses again."""
    import sys

    from fastvae.config import usable_cpus

    threads = saved.get("threads", 0)
    cores = usable_cpus()
    if "threads" not in given and isinstance(threads, int) and threads > cores:
        print(f"note: the run used --threads {threads}; this machine has {cores} core{'s' * (cores != 1)}: torch's default "
              "is used (give --threads to choose)", file=sys.stderr)
        saved.pop("threads")


def _braced(name: str) -> str:
    """argparse's {a,b,c} for a setting's supported choices (its refused ones left out)."""
    from fastvae.config import CHOICES

    return "{" + ",".join(map(str, CHOICES[name])) + "}"
