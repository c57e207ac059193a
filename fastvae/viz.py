"""Pictures of a run.

Image grids (``image_grid``, ``save_image_grid``) use numpy and Pillow only, so the torch-free ONNX
sampler can write PNGs too: this module imports neither torch nor matplotlib at import time.
The functions that take a model import torch inside their bodies; the plots import matplotlib
(headless Agg backend) inside theirs.

``write_run_pictures(run_dir, model, splits)`` writes every picture of a run folder:

- ``samples.png``: 8 x 8 grid of sample means, z ~ N(0, I) (autoencoder: z from a Gaussian fitted
  to its test codes);
- ``reconstructions.png``: 32 test images (top 4 rows; fewer in whole rows of 8 where the
  test split is smaller) above their reconstructions (the rows below);
- ``interpolation.png``: 8 rows of test image A, 10 decodings along mu(A) -> mu(B), test image B;
- ``latent_scatter.png``: test-set latent means coloured by label (only when latent_dim == 2);
- ``loss_curves.png``: loss / recon / KL per epoch from ``metrics.csv`` (train, and test if any);
- spatial latents (c, h, w) also get ``reconstructions_side_by_side.png`` and
  ``latent_channels.png`` (``fastvae.spatial_pictures``);
- ``pictures.json``: what they were drawn from (``pictures_stamp``), so that ``fastvae report``
  redraws pictures of an older checkpoint, seed or data set instead of showing them.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from fastvae import run_folder
from fastvae.errors import FastVAEError

SAMPLES_PNG = "samples.png"
RECONSTRUCTIONS_PNG = "reconstructions.png"
INTERPOLATION_PNG = "interpolation.png"
LATENT_SCATTER_PNG = "latent_scatter.png"
LOSS_CURVES_PNG = "loss_curves.png"
SIDE_BY_SIDE_PNG = "reconstructions_side_by_side.png"  # spatial latents (fastvae.spatial_pictures)
LATENT_CHANNELS_PNG = "latent_channels.png"  # spatial latents
PICTURES_JSON = "pictures.json"
PICTURES = (SAMPLES_PNG, RECONSTRUCTIONS_PNG, SIDE_BY_SIDE_PNG, LATENT_CHANNELS_PNG, INTERPOLATION_PNG,
            LATENT_SCATTER_PNG, LOSS_CURVES_PNG)

# Layouts (tests compute the expected pixel sizes from these).
N_SAMPLES, SAMPLES_NROW = 64, 8
N_RECONSTRUCTIONS, RECONSTRUCTIONS_NROW = 32, 8
INTERP_ROWS, INTERP_STEPS = 8, 10  # each row: A, INTERP_STEPS decodings, B
SCATTER_SIZE_IN, LOSS_SIZE_IN, DPI = (6.0, 6.0), (12.0, 4.0), 100


def _as_nchw(images: np.ndarray) -> np.ndarray:
    """(N, C, H, W), (N, H, W) or channels-last (N, H, W, C) -> float32 (N, C, H, W)."""
    images = np.asarray(images, dtype=np.float32)
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4:
        raise ValueError(f"expected a batch of images with 3 or 4 dims, got shape {images.shape}")
    if images.shape[1] not in (1, 3) and images.shape[-1] in (1, 3):
        images = images.transpose(0, 3, 1, 2)
    return images


def image_grid(images: np.ndarray, nrow: int | None = None, pad: int = 1, scale: int = 1) -> np.ndarray:
    """Tile images (N, C, H, W), (N, H, W) or (N, H, W, C) with values in [0, 1] into one uint8
    array (rows, cols) or (rows, cols, 3); ``scale`` enlarges each pixel (nearest neighbour).

    ``nrow`` is the number of images per grid row (default: ceil(sqrt(N))); the result has
    ``ceil(N / nrow) * (H + pad) + pad`` rows and ``nrow * (W + pad) + pad`` columns, times scale.
    """
    images = _as_nchw(images)
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol_rows = math.ceil(n / nrow)
    grid = np.ones((c, ncol_rows * (h + pad) + pad, nrow * (w + pad) + pad), dtype=np.float32)
    for i, img in enumerate(np.clip(np.nan_to_num(images, nan=0.0), 0.0, 1.0)):
        r, col = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, top : top + h, left : left + w] = img
    grid = (grid * 255.0 + 0.5).astype(np.uint8)
    if scale > 1:
        grid = grid.repeat(scale, axis=1).repeat(scale, axis=2)
    return grid[0] if c == 1 else grid.transpose(1, 2, 0)


def grid_scale(images: np.ndarray) -> int:
    """The automatic enlargement of ``save_image_grid``: images at least ~64 pixels wide/high."""
    _, _, h, w = _as_nchw(images).shape
    return max(1, 64 // max(h, w, 1))


def save_image_grid(images: np.ndarray, path: str | Path, nrow: int | None = None, scale: int | None = None) -> Path:
    """Write ``image_grid(images)`` as a PNG (atomically); small images (e.g. 8x8 digits) are
    enlarged."""
    from PIL import Image

    images = _as_nchw(images)
    if scale is None:
        scale = grid_scale(images)
    picture = Image.fromarray(image_grid(images, nrow=nrow, scale=scale))
    with run_folder.atomic_write(path) as tmp:
        picture.save(tmp)
    return Path(path)


# --------------------------------------------------------------------------- model pictures


def _pyplot():
    """matplotlib.pyplot on the headless Agg backend, or a FastVAEError saying what to install."""
    try:
        import matplotlib
    except ImportError:
        raise FastVAEError(
            "plots need matplotlib, which is not installed: run 'pip install matplotlib'"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _model_device_dtype(model):
    import torch

    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def _encode_means(model, x):
    """Latent means (VAE: mu(x); autoencoder: the code) as a float32 CPU tensor, in batches."""
    import torch

    device, dtype = _model_device_dtype(model)
    out = []
    with torch.no_grad():
        for chunk in torch.as_tensor(x).split(1024):
            code = model.encode(chunk.to(device=device, dtype=dtype))
            if isinstance(code, (tuple, list)):
                code = code[0]
            out.append(code.float().cpu())
    return torch.cat(out) if out else torch.zeros(0, *model.latent_shape)


def _decode_means(model, z):
    """Means of p(x|z) (autoencoder: its decoder output) as a float32 CPU tensor."""
    import torch

    device, dtype = _model_device_dtype(model)
    with torch.no_grad():
        out = model.decode(torch.as_tensor(z).to(device=device, dtype=dtype))
        if model.kind == "vae":
            out = model.likelihood.mean(out)
    return out.float().cpu()


class _EvalMode:
    """Put a module in eval mode for the block and restore its previous mode afterwards."""

    def __init__(self, model):
        self.model, self.was_training = model, bool(getattr(model, "training", False))

    def __enter__(self):
        self.model.eval()
        return self.model

    def __exit__(self, *exc):
        self.model.train(self.was_training)


def _generator(seed: int):
    import torch

    return torch.Generator().manual_seed(int(seed))


def sample_means(model, n: int = N_SAMPLES, seed: int = 0, code_fit=None):
    """n decoded means for z ~ N(0, I) drawn with ``seed`` (a float32 CPU tensor).

    The autoencoder has no prior: pass ``code_fit = (mean, std)`` of its codes (e.g. of the test
    images) to draw z from that diagonal Gaussian instead."""
    import torch

    z = torch.randn(n, *model.latent_shape, generator=_generator(seed))
    if code_fit is not None:
        z = code_fit[0] + code_fit[1] * z
    return _decode_means(model, z)


def save_samples(
    model, path: str | Path, n: int = N_SAMPLES, seed: int = 0, nrow: int = SAMPLES_NROW, code_fit=None
) -> Path:
    with _EvalMode(model):
        images = sample_means(model, n, seed, code_fit)
    return save_image_grid(images.numpy(), path, nrow=nrow)


def save_reconstructions(model, x, path: str | Path, n: int = N_RECONSTRUCTIONS, nrow: int = RECONSTRUCTIONS_NROW) -> Path:
    """The first ``n`` images of ``x`` in the top rows, their reconstructions in the rows below
    (whole rows of ``nrow``: a test split of 28 shows 24, one of 5 a row of 5 above a row of 5,
    so no row mixes the two)."""
    import torch

    x = torch.as_tensor(x)
    n = min(n, len(x))
    if n < nrow:  # one row of originals, one of reconstructions
        nrow = max(n, 1)
    x = x[:n - n % nrow].float().cpu()
    with _EvalMode(model):
        recon = _decode_means(model, _encode_means(model, x))
    return save_image_grid(torch.cat([x, recon.reshape(x.shape)]).numpy(), path, nrow=nrow)


def save_interpolation(
    model, x, path: str | Path, rows: int = INTERP_ROWS, steps: int = INTERP_STEPS, seed: int = 0
) -> Path:
    """Each row: test image A, ``steps`` decodings of (1 - t) mu(A) + t mu(B) for t in [0, 1],
    test image B; the ``rows`` pairs are drawn from ``x`` with ``seed``."""
    import torch

    x = torch.as_tensor(x).float().cpu()
    if len(x) < 2:
        raise FastVAEError("an interpolation needs at least 2 test images")
    rows = min(rows, len(x) // 2)
    idx = torch.randperm(len(x), generator=_generator(seed))[: 2 * rows]
    a, b = x[idx[:rows]], x[idx[rows:]]
    t = torch.linspace(0.0, 1.0, steps).view(1, steps, *[1] * len(model.latent_shape))
    with _EvalMode(model):
        za, zb = _encode_means(model, a), _encode_means(model, b)
        z = (1 - t) * za[:, None] + t * zb[:, None]  # (rows, steps, *latent_shape)
        z = z.reshape(rows * steps, *model.latent_shape)
        decoded = _decode_means(model, z).reshape(rows, steps, *x.shape[1:])
    grid = torch.cat([a[:, None], decoded, b[:, None]], dim=1).reshape(rows * (steps + 2), *x.shape[1:])
    return save_image_grid(grid.numpy(), path, nrow=steps + 2)


def _save_figure(fig, path: str | Path) -> Path:
    fig.tight_layout()
    with run_folder.atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=DPI)
    return Path(path)


def save_latent_scatter(model, x, path: str | Path, labels=None) -> Path:
    """Scatter of the 2-D latent means of ``x``, coloured by ``labels`` when given."""
    if model.latent_dim != 2:
        raise FastVAEError(f"a latent scatter needs a 2-D latent space, this model has {model.latent_dim} dims")
    plt = _pyplot()
    with _EvalMode(model):
        z = _encode_means(model, x).numpy()
    fig, ax = plt.subplots(figsize=SCATTER_SIZE_IN, dpi=DPI)
    try:
        if labels is not None:
            labels = np.asarray(labels).reshape(-1)
            classes = np.unique(labels)
            cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "viridis")
            for i, cls in enumerate(classes):
                keep = labels == cls
                color = cmap(i % 10) if len(classes) <= 10 else cmap(i / max(len(classes) - 1, 1))
                ax.scatter(z[keep, 0], z[keep, 1], s=6, color=color, label=str(cls), alpha=0.8)
            if len(classes) <= 20:
                ax.legend(title="label", markerscale=3, fontsize="small", loc="best")
        else:
            ax.scatter(z[:, 0], z[:, 1], s=6, alpha=0.8)
        ax.set_xlabel("z[0]")
        ax.set_ylabel("z[1]")
        ax.set_title("test-set latent means" if model.kind == "vae" else "test-set codes")
        ax.grid(alpha=0.3)
        return _save_figure(fig, path)
    finally:
        plt.close(fig)


# --------------------------------------------------------------------------- loss curves


_CURVES = (
    ("loss (-ELBO)", ("train_loss", "train"), ("test_neg_elbo", "test")),
    ("reconstruction", ("train_recon", "train"), ("test_recon", "test")),
    ("KL", ("train_kl", "train"), ("test_kl", "test")),
)


# a deterministic autoencoder's: its loss is the squared error, it has no KL
_AE_CURVES = (("loss (squared error)", ("train_loss", "train"), ("test_neg_elbo", "test")),)


def save_loss_curves(metrics_csv: str | Path, path: str | Path, upto_epoch: float = math.inf,
                     kind: str = "vae") -> Path | None:
    """Loss, reconstruction and KL per epoch (train, and test when present) up to
    ``upto_epoch`` (``kind`` "ae": the squared error alone); ``None`` when ``metrics.csv`` is
    missing or has no rows."""
    columns = run_folder.metric_columns(run_folder.read_metrics(metrics_csv, upto_epoch))
    if not columns or "epoch" not in columns:
        return None
    plt = _pyplot()
    epochs = np.asarray(columns["epoch"])
    curves = _AE_CURVES if kind == "ae" else _CURVES
    fig, axes = plt.subplots(1, len(curves), figsize=LOSS_SIZE_IN, dpi=DPI, squeeze=False)
    unit = "squared error per example" if kind == "ae" else "nats per example"
    try:
        for ax, (title, *series) in zip(axes[0], curves):
            for column, label in series:
                if column not in columns:
                    continue
                y = np.asarray(columns[column])
                keep = np.isfinite(y) & np.isfinite(epochs)
                if keep.any():
                    ax.plot(epochs[keep], y[keep], marker="o" if keep.sum() < 30 else None, ms=3, label=label)
            ax.set_title(title)
            ax.set_xlabel("epoch")
            ax.set_ylabel(unit)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend()
        return _save_figure(fig, path)
    finally:
        plt.close(fig)


# --------------------------------------------------------------------------- the run's pictures


def pictures_stamp(run_dir: str | Path, checkpoint: str | Path, seed: int, data: Any) -> dict:
    """What a run folder's pictures show: the checkpoint file drawn from (path in the run folder,
    size, modification time), the ``metrics.csv`` plotted (size, modification time), the seed
    and the data source. A report redraws the pictures when this differs from their stamp."""
    def file_stamp(path: Path) -> list | None:
        try:
            st = path.stat()
        except OSError:
            return None
        return [st.st_size, st.st_mtime_ns]

    run_dir, checkpoint = Path(run_dir), Path(checkpoint)
    return {"checkpoint": [Path(os.path.relpath(checkpoint.resolve(), run_dir.resolve())).as_posix(),
                           file_stamp(checkpoint)],
            "metrics": file_stamp(run_dir / run_folder.METRICS_CSV), "seed": int(seed), "data": str(data)}


def read_pictures_stamp(run_dir: str | Path) -> dict | None:
    """The ``pictures_stamp`` written with a run folder's pictures (None: none, or unreadable)."""
    try:
        return json.loads((Path(run_dir) / PICTURES_JSON).read_text())
    except (OSError, ValueError):
        return None


def write_run_pictures(run_dir: str | Path, model: Any, splits: Any, seed: int = 0,
                       stamp: dict | None = None) -> list[Path]:
    """Write the pictures of a run into ``run_dir`` and return their paths (see the module doc).

    ``model``: a ``VAE`` or ``StackedAutoencoder`` (any device or dtype; its train/eval mode is
    restored). ``splits``: an object with ``.test`` (float tensor (N, C, H, W) in [0, 1]) and
    ``.test_labels`` (or None); ``.train`` is used when the test split is empty. ``seed`` fixes the
    sampled z and the interpolated pairs. ``loss_curves.png`` is written when ``metrics.csv``
    exists; ``latent_scatter.png`` only for 2-D latent spaces. ``stamp`` (``pictures_stamp``) is
    written as ``pictures.json`` after the pictures; without one an older stamp is removed.
    """
    import torch

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    from fastvae.models import unwrap

    model = unwrap(model)
    x = getattr(splits, "test", None)
    labels = getattr(splits, "test_labels", None)
    if x is None or len(x) == 0:
        x, labels = getattr(splits, "train", None), getattr(splits, "train_labels", None)
    if x is None or len(x) == 0:
        raise FastVAEError("no images to draw: the dataset's test and train splits are both empty")
    x = torch.as_tensor(x).float().cpu()
    (run_dir / PICTURES_JSON).unlink(missing_ok=True)  # until every picture is redrawn
    written: list[Path] = []
    with _EvalMode(model):
        code_fit = None
        if model.kind == "ae":  # no prior: sample codes like the test images'
            codes = _encode_means(model, x)
            code_fit = (codes.mean(0), codes.std(0, unbiased=False))
        written.append(save_samples(model, run_dir / SAMPLES_PNG, seed=seed, code_fit=code_fit))
        written.append(save_reconstructions(model, x, run_dir / RECONSTRUCTIONS_PNG))
        if len(x) >= 2:
            written.append(save_interpolation(model, x, run_dir / INTERPOLATION_PNG, seed=seed))
        if len(model.latent_shape) == 3:
            from fastvae.spatial_pictures import write_spatial_pictures

            written += write_spatial_pictures(run_dir, model, x)
        if model.latent_dim == 2:
            labels_np = None if labels is None else torch.as_tensor(labels).cpu().numpy()
            written.append(save_latent_scatter(model, x, run_dir / LATENT_SCATTER_PNG, labels_np))
    from fastvae.checkpoint import trained_epochs

    curves = save_loss_curves(run_dir / run_folder.METRICS_CSV, run_dir / LOSS_CURVES_PNG, trained_epochs(run_dir),
                              kind=model.kind)
    if curves is not None:
        written.append(curves)
    if stamp is not None:
        run_folder.write_text(run_dir / PICTURES_JSON, json.dumps(stamp))
    return written


# --------------------------------------------------------------------------- loggers


def make_loggers(run_dir: str | Path, tensorboard: bool = False) -> list:
    """Fabric loggers for a run: a ``TensorBoardLogger`` writing to ``run_dir/tensorboard`` when
    ``tensorboard`` is true, else none (kept for callers of this name; see ``fastvae.trackers``
    for every tracker)."""
    from fastvae.trackers import make_loggers as trackers

    return trackers(run_dir, ["tensorboard"] if tensorboard else [])
