"""``fastvae evaluate``: -ELBO and IWAE NLL on the test split of a run's data."""

from __future__ import annotations

import argparse

from fastvae.commands import arg_types

HELP = ("evaluate a run on its test split: -ELBO, IWAE NLL, recon, KL (nats per example), bits per dim "
        "(densities: on the data's pixel grid, pixel_levels)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run folder (or .ckpt file) written by 'fastvae train'")
    parser.add_argument("--iwae-k", type=int, default=1000, help="importance samples for the IWAE bound (0 = skip)")
    parser.add_argument("--data", help="evaluate on this data's test split instead of the run's own")
    parser.add_argument("--seed", type=arg_types.seed, help="seed of the evaluation noise (default: the run's seed, "
                        "so -ELBO matches the last test_neg_elbo in metrics.csv; not for runs in bf16-true, "
                        "which evaluated in that precision: this evaluates their weights in fp32)")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--pictures", action="store_true", help="also (re)write the run's PNG pictures")
    parser.add_argument("--quiet", "--no-progress", dest="progress", action="store_false",
                        help="hide the IWAE progress bar (it shows only on a terminal, and not with --json); "
                        "--quiet as for train, prepare and report")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fastvae.checkpoint import load, read_checkpoint
    from fastvae.config import saved_settings
    from fastvae.data import data_grid, load_dataset
    from fastvae.config import check_iwae_k
    from fastvae.errors import FastVAEError
    from fastvae.evaluation import evaluate
    from fastvae.loaders import in_memory_sample

    check_iwae_k(args.iwae_k)  # before loading anything
    pictures_folder = Path(args.run)
    if args.pictures and not pictures_folder.is_dir():  # a checkpoint: its run folder, if any
        checkpoints = pictures_folder.resolve().parent
        if checkpoints.name != "checkpoints":
            raise FastVAEError(f"--pictures writes into a run folder; {args.run} is not inside one "
                               "(RUN/checkpoints/): give the run folder")
        pictures_folder = checkpoints.parent
    state = read_checkpoint(args.run)
    model = load(args.run)
    if model.kind == "ae":
        raise FastVAEError(f"{args.run} holds a deterministic autoencoder (kind 'ae'): it has no ELBO to evaluate")
    data = args.data or state["config"]["data"]
    if args.data:
        from fastvae.data import absolute_source, note_shadowed_folder

        note_shadowed_folder(args.data)
        data = absolute_source(args.data)  # named as the run's own data is (--json, picture stamps)
    seed = args.seed if args.seed is not None else int(state["config"].get("seed", 0))
    from fastvae.shards import run_split

    saved = saved_settings(state["config"])  # split as the run was (older runs: what they were made with)
    try:
        splits = load_dataset(data, **run_split(saved, state), grayscale=saved.get("grayscale", False))
    except FastVAEError as exc:
        if args.data:
            raise
        raise FastVAEError(f"{exc} (the run's data; pass --data to use another copy)") from None
    if not args.data:
        from fastvae.shards import check_run_dataset

        check_run_dataset(args.run, state.get("data_id"), splits, data)
    if tuple(splits.data_shape) != tuple(model.data_shape):
        raise FastVAEError(f"data {data} has images of shape {splits.data_shape} but the model "
                           f"expects {tuple(model.data_shape)}: evaluate on data like the training data")
    result = {"run": str(args.run), "data": str(data),
              **evaluate(model, splits.test, iwae_k=args.iwae_k, seed=seed, progress=args.progress and not args.json,
                         pixel_grid=data_grid(splits))}
    if args.pictures:  # into the run folder (a checkpoint's: RUN/checkpoints/X.ckpt)
        from fastvae import viz

        from fastvae.checkpoint import checkpoint_path

        stamp = viz.pictures_stamp(pictures_folder, checkpoint_path(args.run), seed, data)
        viz.write_run_pictures(pictures_folder, model, in_memory_sample(splits), seed=seed, stamp=stamp)
    if args.json:
        from fastvae.commands.json_output import json_line

        print(json_line(result))
    else:
        for key, value in result.items():
            if value is None and key == "pixel_levels":
                value = "none (the data's values lie on no pixel grid)"
            elif value is None:  # bits_per_dim of a density
                value = "none (a density's bits need pixels on a grid of 1/16 or finer)"
            print(f"{key:>10}: {value:.4f}" if isinstance(value, float) else f"{key:>10}: {value}")
    return 0
