"""``fastvae report RUN``: one Markdown (or HTML) page with a run's settings, metrics, pictures
and timing."""

from __future__ import annotations

from fastvae.commands import arg_types

HELP = "write a report page (Markdown or HTML) of a run: settings, metrics, pictures, timing"
DESCRIPTION = (
    "Evaluate a trained run on its test split (-ELBO, IWAE NLL, reconstruction, KL, KL per latent "
    "dim, active units), draw its missing pictures and write one page that shows them with the "
    "run's settings and training times."
)


def add_arguments(parser) -> None:
    parser.add_argument("run", metavar="RUN", help="run folder written by 'fastvae train --out RUN'")
    parser.add_argument("--out", type=arg_types.path, default=None, help="report file, .md (Markdown) or .html (default RUN/report.md, or RUN/report.html with --html)")
    parser.add_argument("--html", action="store_true", help="write HTML instead of Markdown (implied by --out *.html)")
    parser.add_argument("--iwae-k", type=int, default=1000, help="importance samples for the IWAE bound; 0 skips it")
    parser.add_argument("--data", default=None, help="data source to evaluate on (default: the run's config.json 'data')")
    parser.add_argument("--redraw", action="store_true", help="redraw all pictures, not only the missing ones")
    parser.add_argument("--seed", type=arg_types.seed, help="seed of the evaluation noise and the sampled pictures "
                        "(default: the run's seed, so -ELBO matches the last test_neg_elbo in metrics.csv)")
    parser.add_argument("--quiet", "--no-progress", dest="progress", action="store_false",
                        help="hide the IWAE progress bar (it shows only on a terminal anyway); --quiet as "
                        "for train and prepare")


def run(args) -> int:
    from fastvae.data import absolute_source, note_shadowed_folder
    from fastvae.report_page import write_report

    if args.data:
        note_shadowed_folder(args.data)
    path = write_report(
        args.run, args.out, iwae_k=args.iwae_k, html=True if args.html else None,
        data=args.data and absolute_source(args.data),
        redraw=args.redraw, seed=args.seed, progress=args.progress,
    )
    print(path)
    return 0
