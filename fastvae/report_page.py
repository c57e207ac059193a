"""One page about a run: its settings, test-set metrics, latent usage, pictures and timing.

``write_report(run_dir)`` loads the run's model (``fastvae.load``) and data (the run's
``config.json`` ``data`` setting), evaluates -ELBO, the IWAE bound, reconstruction and KL
(``fastvae.evaluation.evaluate``), computes the KL of every latent dimension and the active units
(``latent_stats``), draws the pictures that are missing (``fastvae.viz.write_run_pictures``) and
writes ``RUN/report.md`` (or an HTML page) that links them.

Active units (Burda et al. 2016, "Importance Weighted Autoencoders"): latent dimension u is active
when A_u = Cov_x(E_{q(z|x)}[z_u]) > 0.01, i.e. when the posterior mean of z_u moves with x.
KL per dimension: the test-set mean of 0.5 (mu_u^2 + exp(logvar_u) - 1 - logvar_u); the dims sum to
the KL term of the -ELBO.
"""

from __future__ import annotations

import datetime as _dt
import html as _html
import json
import math
import os
import sys
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastvae import run_folder
from fastvae.config import check_iwae_k, saved_settings
from fastvae.errors import FastVAEError

ACTIVE_THRESHOLD = 0.01
DEFAULT_IWAE_K = 1000
PAGE_SUFFIXES = {".md": False, ".markdown": False, ".html": True, ".htm": True}  # suffix: HTML?

# Metric keys of ``fastvae.evaluation.evaluate`` shown first, with their names and meanings.
KNOWN_METRICS = {
    "neg_elbo": ("-ELBO", "upper bound on -log p(x): reconstruction + KL"),
    "iwae_nll": ("IWAE NLL", "tighter upper bound on -log p(x) (importance weighted, K samples)"),
    "recon": ("reconstruction", "-E_q[log p(x|z)]"),
    "kl": ("KL", "KL(q(z|x) || p(z))"),
    "mse": ("MSE", "squared error per example, summed over its pixel values"),
    "bits_per_dim": ("bits per dim", "the tightest bound in bits per pixel value (densities: + log2(levels - 1), "
                     "the bins of the pixels' grid)"),
    "pixel_levels": ("pixel levels", "the values a pixel takes, k / (levels - 1): 256 for 8-bit images"),
    "psnr": ("reconstruction PSNR (dB)", "10 log10(1/m), m the mean squared error per pixel value of the "
             "reconstructions over all test images"),
    "learned_sigma": ("learned sigma", "the likelihood's scale the run learned (--sigma was where it started)"),
    "bicubic_psnr": ("bicubic baseline PSNR (dB)", "the images bicubic-downsampled by f and upsampled back: "
                     "the trivial codec with as many values per pixel as the latent's f"),
}


# --------------------------------------------------------------------------- latent statistics


def latent_stats(model: Any, x: Any, threshold: float = ACTIVE_THRESHOLD, batch_size: int = 1024) -> dict:
    """Per-dimension latent usage on the images ``x`` (N, C, H, W; a tensor or a prepared split).

    Returns ``activity`` (A_u = Cov_x(E_q[z_u]), the variance over x of the posterior mean, one
    float per dim), ``active_units`` (how many A_u exceed ``threshold``), ``latent_dim``,
    ``latent_shape`` (one example's, e.g. [c, h, w]; the per-dim lists run over it flattened),
    ``threshold`` and, for a VAE, ``kl_per_dim`` (test-set mean of
    0.5 (mu^2 + exp(logvar) - 1 - logvar) per dim). For the deterministic autoencoder the code
    plays the role of the mean and ``kl_per_dim`` is None.
    """
    import torch

    from fastvae.distributions import kl_standard_normal_per_dim
    from fastvae.loaders import image_batches

    if len(x) < 2:
        raise FastVAEError(f"latent statistics need at least 2 test images, got {len(x)}")
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    was_training = model.training
    model.eval()
    n = 0
    mu_sum = mu_sq = kl_sum = None
    try:
        with torch.no_grad():
            for chunk in image_batches(x, batch_size):
                out = model.encode(chunk.to(device=device, dtype=dtype))
                mu, logvar = (out[0], out[1]) if isinstance(out, (tuple, list)) else (out, None)
                shape = tuple(mu.shape[1:])
                mu = mu.double().cpu().flatten(1)  # spatial latents: every c*h*w dim
                mu_sum = mu.sum(0) if mu_sum is None else mu_sum + mu.sum(0)
                mu_sq = mu.pow(2).sum(0) if mu_sq is None else mu_sq + mu.pow(2).sum(0)
                if logvar is not None:
                    logvar = logvar.double().cpu().flatten(1)
                    kl = kl_standard_normal_per_dim(mu, logvar)
                    kl_sum = kl.sum(0) if kl_sum is None else kl_sum + kl.sum(0)
                n += len(mu)
    finally:
        model.train(was_training)
    mean = mu_sum / n
    activity = (mu_sq / n - mean.pow(2)).clamp_min(0.0)  # population variance of E_q[z_u]
    return {
        "latent_dim": int(activity.numel()),
        "latent_shape": list(shape),
        "threshold": float(threshold),
        "activity": [float(a) for a in activity],
        "active_units": int((activity > threshold).sum()),
        "kl_per_dim": None if kl_sum is None else [float(k) for k in kl_sum / n],
    }


# --------------------------------------------------------------------------- run folder reading


def timing_summary(columns: dict[str, list[float]]) -> dict:
    """Epochs, steps and epoch times from ``metrics.csv`` columns (``run_folder.metric_columns``)."""
    out: dict[str, Any] = {}
    epochs = [e for e in columns.get("epoch", []) if math.isfinite(e)]
    if not epochs:
        return out
    out["epochs"] = int(max(epochs))
    steps = [s for s in columns.get("step", []) if math.isfinite(s)]
    if steps:
        out["steps"] = int(max(steps))
    times = [t for t in columns.get("epoch_time_s", []) if math.isfinite(t)]
    if times:
        out["total_time_s"] = sum(times)
        out["mean_epoch_time_s"] = sum(times) / len(times)
        out["first_epoch_time_s"] = times[0]
        if len(times) > 1:
            out["mean_epoch_time_after_first_s"] = sum(times[1:]) / (len(times) - 1)
    last = {}
    for name, values in columns.items():
        finite = [v for v in values if math.isfinite(v)]
        if name not in ("epoch", "step", "epoch_time_s") and finite:
            last[name] = finite[-1]
    out["last"] = last
    return out


# --------------------------------------------------------------------------- page blocks


class Page:
    """A tiny document model (headings, paragraphs, tables, images) rendered as Markdown or
    HTML. Inline ``code`` spans in backticks are the only inline markup."""

    def __init__(self, title: str):
        self.title = title
        self.blocks: list[tuple] = []

    def h(self, text: str, level: int = 2):
        self.blocks.append(("h", level, text))

    def p(self, text: str):
        self.blocks.append(("p", text))

    def table(self, header: list[str], rows: list[list[Any]], align: str | None = None):
        self.blocks.append(("table", header, [[_cell(c) for c in row] for row in rows], align))

    def img(self, alt: str, src: str):
        self.blocks.append(("img", alt, src))

    def markdown(self) -> str:
        lines = [f"# {_md_inline(self.title)}", ""]
        for block in self.blocks:
            kind = block[0]
            if kind == "h":
                lines += ["#" * block[1] + " " + _md_inline(block[2]), ""]
            elif kind == "p":
                lines += [_md_inline(block[1]), ""]
            elif kind == "table":
                _, header, rows, align = block
                align = align or "l" + "r" * (len(header) - 1)
                lines.append("| " + " | ".join(_md_escape(h) for h in header) + " |")
                lines.append("|" + "|".join(":---" if a == "l" else "---:" for a in align) + "|")
                lines += ["| " + " | ".join(_md_escape(c) for c in row) + " |" for row in rows]
                lines.append("")
            elif kind == "img":
                lines += [f"![{block[1]}]({_md_url(block[2])})", ""]
        return "\n".join(lines).rstrip() + "\n"

    def html(self) -> str:
        body = [f"<h1>{_inline_html(self.title)}</h1>"]
        for block in self.blocks:
            kind = block[0]
            if kind == "h":
                body.append(f"<h{block[1]}>{_inline_html(block[2])}</h{block[1]}>")
            elif kind == "p":
                body.append(f"<p>{_inline_html(block[1])}</p>")
            elif kind == "table":
                _, header, rows, align = block
                align = align or "l" + "r" * (len(header) - 1)
                style = ['' if a == "l" else ' class="num"' for a in align]
                body.append("<table>")
                body.append("<tr>" + "".join(f"<th{s}>{_inline_html(h)}</th>" for h, s in zip(header, style)) + "</tr>")
                for row in rows:
                    body.append("<tr>" + "".join(f"<td{s}>{_inline_html(c)}</td>" for c, s in zip(row, style)) + "</tr>")
                body.append("</table>")
            elif kind == "img":
                src = _html.escape(_md_url(block[2]), quote=True)
                body.append(f'<p><img src="{src}" alt="{_html.escape(block[1], quote=True)}"></p>')
        css = (
            "body{font-family:sans-serif;max-width:72em;margin:2em auto;padding:0 1em;color:#222}"
            "table{border-collapse:collapse;margin:0.5em 0 1em}"
            "th,td{border:1px solid #ccc;padding:0.2em 0.6em;text-align:left}"
            "td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}"
            "code{background:#f4f4f4;padding:0 0.2em}img{max-width:100%;image-rendering:pixelated}"
        )
        return (
            "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{_html.escape(_unmarked(self.title))}</title>\n<style>{css}</style>\n</head>\n<body>\n"
            + "\n".join(body)
            + "\n</body>\n</html>\n"
        )


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return _num(value)
    if isinstance(value, (dict, list, tuple)):
        return _code(json.dumps(value))
    return str(value)


def _num(value: float) -> str:
    """Four decimals; scientific notation for very large or small magnitudes."""
    if not math.isfinite(value):
        return str(value)
    if value != 0 and (abs(value) >= 1e7 or abs(value) < 1e-4):
        return f"{value:.3e}"
    return f"{value:.4f}"


# Text from the user (folder names, data sources, settings) is wrapped by ``_user`` (shown as
# is) or ``_code`` (a code span) in marks no name contains, so each renderer escapes it for its
# format: a backtick, `<` or `*` in a run folder's name must not become markup.
_USER, _CODE, _END = "\x02", "\x03", "\x04"
_MARKED = re.compile(f"([{_USER}{_CODE}])([^{_END}]*){_END}")


def _user(text: Any) -> str:
    return _USER + _unmarked(text) + _END


def _code(text: Any) -> str:
    return _CODE + _unmarked(text) + _END


def _unmarked(text: Any) -> str:
    return re.sub(f"[{_USER}{_CODE}{_END}]", "", str(text))


def _render(text: str, static, user, code) -> str:
    """``text`` with its static parts through ``static`` and the marked ones through ``user``
    or ``code``."""
    text, out, pos = str(text), [], 0
    for m in _MARKED.finditer(text):
        out += [static(text[pos:m.start()]), (user if m.group(1) == _USER else code)(m.group(2))]
        pos = m.end()
    return "".join(out + [static(text[pos:])])


def _md_inline(text: str) -> str:
    return _render(text, lambda s: s, _md_user, _md_code)


def _md_user(text: str) -> str:
    return re.sub(r"([\\`*_\[\]<>&!#])", r"\\\1", text)


def _md_code(text: str) -> str:
    """A Markdown code span: fenced by more backticks than any run inside it."""
    fence = "`" * (max((len(r) for r in re.findall("`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _md_escape(text: str) -> str:
    """A Markdown table cell (a ``|`` ends a cell, also inside code spans)."""
    return _md_inline(text).replace("|", "\\|").replace("\n", " ")


def _md_url(src: str) -> str:
    return quote(src, safe="/")


def _inline_html(text: str) -> str:
    def static(part: str) -> str:  # our own text: backticks mark code spans
        pieces = re.split(r"`([^`]*)`", part)
        return "".join(f"<code>{_html.escape(p)}</code>" if i % 2 else _html.escape(p)
                       for i, p in enumerate(pieces))

    return _render(text, static, _html.escape, lambda t: f"<code>{_html.escape(t)}</code>")


def _seconds(s: float) -> str:
    if s >= 120:
        return f"{s / 60:.1f} min ({s:.0f} s)"
    return f"{s:.2f} s" if s < 10 else f"{s:.1f} s"


# --------------------------------------------------------------------------- the report


PICTURE_CAPTIONS = {
    "samples.png": ("Samples", "Means of p(x|z) for 64 draws z ~ N(0, I)."),
    "reconstructions.png": (
        "Reconstructions",
        "Test images in the top half (32, or whole rows of 8 from a smaller test split) and the means "
        "of p(x|z = mu(x)) below them, in the same order.",
    ),
    "interpolation.png": (
        "Latent interpolation",
        "Each row: a test image, 10 decodings along the straight line between the two images' "
        "latent means, the second test image.",
    ),
    "latent_scatter.png": ("Latent space", "Latent means of the test images, coloured by label."),
    "reconstructions_side_by_side.png": (
        "Reconstructions at full size",
        "Each row: a test image, its reconstruction, and the bicubic down-then-up codec by the same f.",
    ),
    "latent_channels.png": (
        "Latent channels",
        "Each row: a test image, then each channel of its latent mean as a grey image (-3 black, +3 white), "
        "upsampled by f to line up with the pixels.",
    ),
    "loss_curves.png": ("Loss curves", "Per-epoch averages from `metrics.csv` (nats per example)."),
}
# The deterministic autoencoder (--kind ae): no prior, no p(x|z), squared-error loss.
AE_CAPTIONS = {
    "samples.png": ("Samples", "Decodings of 64 codes drawn from a Gaussian fitted to the test images' codes "
                               "(an autoencoder has no prior to sample from)."),
    "reconstructions.png": ("Reconstructions", "Test images in the top half (32, or whole rows of 8 from a "
                                               "smaller test split) and their reconstructions below them, "
                                               "in the same order."),
    "interpolation.png": ("Latent interpolation", "Each row: a test image, 10 decodings along the straight "
                                                  "line between the two images' codes, the second test image."),
    "latent_scatter.png": ("Latent space", "Codes of the test images, coloured by label."),
    "loss_curves.png": ("Loss curves", "Per-epoch averages from `metrics.csv` (squared error per example)."),
}


@dataclass
class ReportData:
    """Everything the report page shows, gathered by ``write_report``."""

    run_dir: Path
    out: Path  # the page's own path (pictures are linked relative to it)
    config: dict
    metrics: dict
    stats: dict | None  # latent_stats of the test images
    timing: dict  # timing_summary of metrics.csv
    pictures: list[Path]
    iwae_k: int
    model_kind: str = "vae"
    n_test: int | None = None
    data_shape: tuple | None = None
    data_source: str | None = None  # the data evaluated (default: the run's own)
    labelled: bool = True  # the test images have labels (the latent scatter is coloured by them)
    prepared_split: dict | None = None  # a prepared dataset's split (shards.prepared_split)
    unfinished: str | None = None  # an unfinished run's checkpoint (fastvae.checkpoint.unfinished)


def build_page(data: ReportData) -> Page:
    """Lay out the report: summary, configuration, metrics, latent usage, pictures, timing."""
    page = Page(f"fastvae run report: {_user(data.run_dir.resolve().name)}")
    for section in (_summary, _configuration, _test_metrics, _latent_dimensions, _pictures, _timing):
        section(page, data)
    return page


def _summary(page: Page, d: ReportData) -> None:
    from fastvae import __version__

    when = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    config, vae = d.config, d.model_kind == "vae"
    summary = [f"Run folder {_code(os.path.abspath(d.run_dir))}"]  # the page may live elsewhere: "." would mislead
    if config:
        shape = "x".join(map(str, d.data_shape or ()))
        trained_on = config.get("data", "?")
        source = d.data_source or trained_on
        summary.append(f"data {_code(source)}"
                       + (f" (the run was trained on {_code(trained_on)})" if source != trained_on else "")
                       + (f" ({d.n_test} test image{'s' if d.n_test != 1 else ''} of shape {shape})"
                          if d.n_test and shape else ""))
        model = f"{config.get('model', '?')} {'VAE' if vae else 'autoencoder (MSE)'}"
        size = (f"latent {'x'.join(map(str, d.stats['latent_shape']))}" if d.stats and len(d.stats["latent_shape"]) > 1
                else f"latent dim {config.get('latent_dim', '?')}, hidden dim {config.get('hidden_dim', '?')}")
        summary.append(
            f"model {model}, {size}"
            + (f", {config.get('likelihood')} likelihood" if vae and "likelihood" in config else "")
        )
    if d.unfinished:
        summary.append(f"an unfinished run: its checkpoint is at {d.unfinished} (`fastvae train --resume` "
                       "continues it)")
    if d.timing.get("epochs") is not None:
        epochs = d.timing["epochs"]
        summary.append(f"{epochs} epoch{'' if epochs == 1 else 's'} ({d.timing.get('steps', '?')} steps)")
    page.p("; ".join(summary) + f". Written {when} by fastvae {__version__}.")


def _configuration(page: Page, d: ReportData) -> None:
    from fastvae.config import unused_settings

    page.h("Configuration")
    unused = unused_settings(d.config.get("model", ""))
    page.table(["setting", "value"], [[k, _setting(v)] for k, v in d.config.items() if k not in unused],
               align="ll")
    left_out = [k for k in unused if k in d.config]
    if left_out:
        page.p(f"Left out: {', '.join(left_out)} (not read by a {d.config.get('model')} model).")
    if d.prepared_split is not None:  # the run's test_fraction/split_seed cut nothing
        made = ", ".join(f"{k} {v}" for k, v in d.prepared_split.items())
        page.p(f"The data is a prepared dataset, split by `fastvae prepare` ({made}): the settings "
               "test_fraction and split_seed above are not used.")


def _test_metrics(page: Page, d: ReportData) -> None:
    page.h("Test-set metrics")
    metrics, stats = d.metrics, d.stats
    if not metrics:
        page.p("Not evaluated.")
        return
    page.p(
        ("Nats per example" if d.model_kind == "vae" else "Squared error per example and PSNR")
        + " on the test split"
        + (f" ({d.n_test} image{'s' if d.n_test != 1 else ''})" if d.n_test else "")
        + (f"; the IWAE bound uses K = {d.iwae_k} importance samples." if "iwae_nll" in metrics else ".")
    )
    rows = []
    for key, (name, meaning) in KNOWN_METRICS.items():
        if key in metrics and metrics[key] is not None:
            label = f"{name} (K = {d.iwae_k})" if key == "iwae_nll" else name
            rows.append([label, _metric_value(metrics[key]), meaning])
    if stats is not None:
        rows.append([
            "active units", f"{stats['active_units']} / {stats['latent_dim']}",
            f"latent dims with Cov_x(E_q[z_u]) > {stats['threshold']:g}",
        ])
    for key, value in metrics.items():
        if key not in KNOWN_METRICS and key not in ("n", "iwae_k") and _is_scalar(value):
            rows.append([key, _metric_value(value), ""])
    page.table(["metric", "value", "meaning"], rows, align="lrl")


def _latent_dimensions(page: Page, d: ReportData) -> None:
    stats = d.stats
    if stats is None:
        return
    page.h("Latent dimensions", 3)
    if len(stats.get("latent_shape", ())) == 3:
        _latent_channels_table(page, stats)
        return
    kl = stats.get("kl_per_dim")
    header = ["dim"] + (["KL (nats)"] if kl else []) + ["Cov_x(E_q[z_u])", "active"]
    rows = []
    for u, a in enumerate(stats["activity"]):
        rows.append([u] + ([kl[u]] if kl else []) + [a, a > stats["threshold"]])
    if kl:
        rows.append(["sum", sum(kl), "", f"{stats['active_units']} of {stats['latent_dim']}"])
    page.table(header, rows, align="l" + "r" * (len(header) - 2) + "l")
    if kl:
        page.p(
            "KL per dimension: test-set mean of 0.5 (mu^2 + exp(logvar) - 1 - logvar); the dims add "
            "up to the KL term. A dim is active when the variance over test images of its "
            f"posterior mean exceeds {stats['threshold']:g} (Burda et al. 2016)."
        )


def _latent_channels_table(page: Page, stats: dict) -> None:
    """Spatial latents (c, h, w): one row per channel, its h*w dims summed or averaged."""
    c, h, w = stats["latent_shape"]
    activity, kl = stats["activity"], stats.get("kl_per_dim")
    header = ["channel"] + (["KL (nats)"] if kl else []) + ["mean Cov_x(E_q[z_u])", "active dims"]
    rows = []
    for ch in range(c):
        dims = slice(ch * h * w, (ch + 1) * h * w)
        acts = activity[dims]
        active = sum(a > stats["threshold"] for a in acts)
        rows.append([ch] + ([sum(kl[dims])] if kl else []) + [sum(acts) / len(acts), f"{active} of {h * w}"])
    if kl:
        rows.append(["sum", sum(kl), "", f"{stats['active_units']} of {stats['latent_dim']}"])
    page.table(header, rows, align="l" + "r" * (len(header) - 1))
    what = "sums the KL of a channel's positions (test-set means) and averages" if kl else "averages"
    page.p(f"The latent is {c} channels of {h}x{w} positions; each row {what} their activity.")


def _pictures(page: Page, d: ReportData) -> None:
    page.h("Pictures")
    for picture in d.pictures:
        captions = AE_CAPTIONS if d.model_kind == "ae" else {}
        title, caption = captions.get(picture.name) or PICTURE_CAPTIONS.get(picture.name, (picture.stem.replace("_", " "), ""))
        if not d.labelled:  # the scatter of unlabelled data has one colour
            caption = caption.replace(", coloured by label.", ".")
        page.h(title, 3)
        page.img(title, Path(os.path.relpath(picture, d.out.parent)).as_posix())
        if caption:
            page.p(caption)
    if not d.pictures:
        page.p("No pictures.")


def _timing(page: Page, d: ReportData) -> None:
    page.h("Timing")
    timing = d.timing
    if timing.get("epochs") is None:
        page.p("No `metrics.csv` rows: training times unknown.")
        return
    rows = [["epochs", timing["epochs"]]]
    if "steps" in timing:
        rows.append(["optimizer steps", timing["steps"]])
    if "total_time_s" in timing:
        rows += [
            ["total training time", _seconds(timing["total_time_s"])],
            ["mean epoch time", _seconds(timing["mean_epoch_time_s"])],
            ["first epoch", _seconds(timing["first_epoch_time_s"])],
        ]
        if "mean_epoch_time_after_first_s" in timing:
            rows.append(["mean epoch time after the first", _seconds(timing["mean_epoch_time_after_first_s"])])
    for name, value in timing.get("last", {}).items():
        rows.append([f"last {name}", value])
    page.table(["", "value"], rows, align="lr")
    page.p("From `metrics.csv`: `epoch_time_s` is the wall time of each epoch's training steps.")


def _setting(value: Any) -> str:
    """A config value as the user wrote it (``1e-3`` stays ``0.001``, booleans as true/false)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list, tuple)):
        return _code(json.dumps(value))
    return repr(value) if isinstance(value, float) else _user(str(value))


def _is_scalar(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _metric_value(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def write_report(
    run_dir: str | Path,
    out: str | Path | None = None,
    *,
    iwae_k: int = DEFAULT_IWAE_K,
    html: bool | None = None,
    data: str | None = None,
    redraw: bool = False,
    seed: int | None = None,
    model: Any = None,
    splits: Any = None,
    metrics: dict | None = None,
    progress: bool = False,
) -> Path:
    """Write the report of a run folder and return its path.

    ``out``: default ``RUN/report.md`` (``RUN/report.html`` with ``html=True``); a ``.html`` path
    means HTML. ``iwae_k``: importance samples of the IWAE bound (0 skips it). ``data``: the data
    source, default the run's ``config.json`` setting. ``redraw``: redraw every picture, not
    only the missing ones. ``seed``: of the evaluation noise and the sampled pictures; default
    the run's own seed, so the report's -ELBO is the last ``test_neg_elbo`` of ``metrics.csv``.
    ``model``, ``splits``, ``metrics``: use these instead of loading the checkpoint, loading the
    data or evaluating (for callers that already have them). ``progress``: show a progress bar
    while the IWAE bound runs.
    """
    if not str(run_dir).strip():  # "" would be the current folder
        raise FastVAEError("the run folder is empty: give the --out folder of a 'fastvae train' run")
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise FastVAEError(f"run folder {run_dir} does not exist: give the --out folder of a 'fastvae train' run")
    if not run_dir.is_dir():
        raise FastVAEError(f"{run_dir} is a file, not a run folder: give the --out folder of a 'fastvae train' run")
    check_iwae_k(iwae_k)
    if out is not None and (str(out).endswith(("/", os.sep)) or Path(out).is_dir()):
        raise FastVAEError(f"--out {out} is a folder: give a file name such as {Path(out) / 'report.md'}")
    if out is not None:
        suffix = Path(out).suffix.lower()
        if suffix not in PAGE_SUFFIXES:  # never a checkpoint, config.json or picture of the run
            raise FastVAEError(f"--out must end in .md or .markdown (Markdown), or .html or .htm (HTML), got "
                               f"{Path(out).name!r}")
        if html is not None and html != PAGE_SUFFIXES[suffix]:
            raise FastVAEError(f"--out {Path(out).name} names a {'HTML' if PAGE_SUFFIXES[suffix] else 'Markdown'} file "
                               f"but {'HTML' if html else 'Markdown'} was asked for: end it in "
                               f"{'.html' if html else '.md'}")
        html = PAGE_SUFFIXES[suffix]
    out = Path(out) if out is not None else run_dir / ("report.html" if html else "report.md")
    _check_writable(out.parent)  # before minutes of evaluation

    import torch

    from fastvae.viz import PICTURES, pictures_stamp, read_pictures_stamp, write_run_pictures

    if model is None:
        from fastvae.checkpoint import load

        model = load(run_dir)  # FastVAEError when the run has no (readable) checkpoint
    from fastvae.config import MODEL_SETTINGS
    from fastvae.models import unwrap

    # the model's settings are those of the model evaluated (a config.json edited or copied from
    # another run would describe another model); the rest (where the data is) from config.json
    spec = getattr(unwrap(model), "spec", None) or {}
    config = saved_settings({**run_folder.read_run_config(run_dir),
                             **{k: v for k, v in spec.items() if k in MODEL_SETTINGS}})
    seed = int(config.get("seed", 0)) if seed is None else seed
    source = data or config.get("data")
    if splits is None:
        splits = _load_run_data(run_dir, source, config, given=data is not None)
    from fastvae.loaders import in_memory_sample

    from fastvae.data import data_grid

    grid = data_grid(splits)  # the source's pixel grid: the sample drawn below has none
    from fastvae.shards import prepared_split

    prepared = prepared_split(splits) if hasattr(splits, "meta") else None
    full, splits = splits.test, in_memory_sample(splits)  # streamed: evaluate all, draw the first
    test = torch.as_tensor(splits.test).float()
    if tuple(test.shape[1:]) != tuple(model.data_shape):
        raise FastVAEError(
            f"the data's images are {tuple(test.shape[1:])} but the model was trained on "
            f"{tuple(model.data_shape)}: pass --data with the run's data set"
        )
    # every test image; read again in batches only when the pictures' sample holds fewer
    evaluated = full if len(full) != len(test) else test
    if metrics is None:
        metrics = _evaluate(model, evaluated, iwae_k, seed, progress, grid)
    stats = latent_stats(model, evaluated) if len(full) >= 2 else None

    metrics_csv = run_dir / run_folder.METRICS_CSV
    expected = ["samples.png", "reconstructions.png"]
    expected += ["interpolation.png"] if len(test) >= 2 else []
    expected += ["latent_scatter.png"] if model.latent_dim == 2 else []
    expected += ["reconstructions_side_by_side.png", "latent_channels.png"] if len(model.latent_shape) == 3 else []
    expected += ["loss_curves.png"] if run_folder.read_metrics(metrics_csv) else []  # a header only: none drawn
    # redrawn when missing, or drawn from another checkpoint, metrics.csv, seed or data set
    stamp = pictures_stamp(run_dir, run_dir / run_folder.LAST, seed, source)
    if redraw or read_pictures_stamp(run_dir) != stamp or not all((run_dir / name).is_file() for name in expected):
        shown = read_pictures_stamp(run_dir)
        write_run_pictures(run_dir, model, splits, seed=seed, stamp=stamp)
        if shown is not None and out.parent.resolve() != run_dir.resolve() and (
                (shown.get("seed"), shown.get("data")) != (stamp["seed"], stamp["data"])):
            # the run's own pages link these pictures too
            print(f"note: {run_dir}'s pictures now show seed {seed} and data {source} (this page's); "
                  f"'fastvae report {run_dir}' draws the run's own again", file=sys.stderr)
    pictures = [run_dir / name for name in PICTURES if (run_dir / name).is_file()]
    if model.latent_dim != 2:
        pictures = [p for p in pictures if p.name != "latent_scatter.png"]  # left from another run
    if len(model.latent_shape) != 3:
        pictures = [p for p in pictures if p.name not in ("reconstructions_side_by_side.png", "latent_channels.png")]

    from fastvae.checkpoint import trained_epochs, unfinished

    timing = timing_summary(run_folder.metric_columns(run_folder.read_metrics(metrics_csv, trained_epochs(run_dir))))
    page = build_page(ReportData(
        run_dir, out, config, metrics, stats, timing, pictures, iwae_k=iwae_k,
        model_kind=model.kind, n_test=len(full), data_shape=tuple(test.shape[1:]), data_source=source,
        labelled=splits.test_labels is not None, prepared_split=prepared,
        unfinished=unfinished(run_dir) if (run_dir / run_folder.LAST).is_file() else None,
    ))
    return run_folder.write_text(out, page.html() if html else page.markdown())


def _check_writable(folder: Path) -> None:
    """A file can be created in ``folder`` (``run_folder.write_failure_in``; a missing folder is
    made when the page is written)."""
    failure = run_folder.write_failure_in(folder)
    if failure is not None:
        from fastvae.errors import write_failure

        raise FastVAEError(f"cannot write into {folder} ({write_failure(failure)}): check the path and its "
                           "permissions")


def _load_run_data(run_dir: Path, source: str | None, config: dict, given: bool):
    if not source:
        raise FastVAEError(f"{run_dir}/config.json names no data set: pass --data SOURCE")
    from fastvae.checkpoint import read_checkpoint
    from fastvae.data import load_dataset
    from fastvae.shards import check_run_dataset, run_split

    state = read_checkpoint(run_dir, mmap=True) if (run_dir / run_folder.LAST).is_file() else {}
    try:  # split as the run was (config.json, or its prepared dataset's; older runs: the defaults)
        splits = load_dataset(source, **run_split(config, state), grayscale=config.get("grayscale", False))
    except FastVAEError as exc:
        if given:
            raise
        raise FastVAEError(f"{exc} (the run's data; pass --data to use another copy)") from None
    if not given and state:
        check_run_dataset(run_dir, state.get("data_id"), splits, source)
    return splits


def _evaluate(model, test, iwae_k: int, seed: int, progress: bool = False, grid="auto") -> dict:
    """``fastvae.evaluation.evaluate`` on the test images; for the deterministic autoencoder (no
    likelihood, no KL) its MSE cost."""
    import torch

    from fastvae.evaluation import elbo_sums, evaluate
    from fastvae.image_quality import reconstruction_psnr

    if model.kind == "ae":
        sums = elbo_sums(model, test)  # the autoencoder's recon is its per-example squared error
        return {"mse": float(sums[1]) / float(sums[3]), **reconstruction_psnr(model, test)}
    scale = getattr(getattr(model, "likelihood", None), "log_scale", None)
    learned = {"learned_sigma": float(scale.detach().float().exp().mean())} if isinstance(scale, torch.nn.Parameter) else {}
    return {**evaluate(model, test, iwae_k=iwae_k, seed=seed, progress=progress, pixel_grid=grid),
            **learned, **reconstruction_psnr(model, test)}
