"""Pictures: image grids (torch-free), the run's pictures, loss curves, loggers."""

from __future__ import annotations

import math
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from fastvae import run_folder, viz
from fastvae.errors import FastVAEError
from fastvae.models import build_model


def grid_size(n: int, h: int, w: int, nrow: int, scale: int, pad: int = 1) -> tuple[int, int]:
    """(width, height) in pixels of ``image_grid`` for n images of h x w, nrow per row."""
    rows = math.ceil(n / nrow)
    return (nrow * (w + pad) + pad) * scale, (rows * (h + pad) + pad) * scale


def png_size(path) -> tuple[int, int]:
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        return img.size


def test_viz_imports_without_torch_or_matplotlib():
    code = (
        "import sys, fastvae.viz\n"
        "bad = [m for m in ('torch', 'matplotlib') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_image_grid_layouts():
    gray = np.random.default_rng(0).random((5, 1, 4, 6))
    grid = viz.image_grid(gray, nrow=3)
    assert grid.dtype == np.uint8 and grid.shape == (2 * 5 + 1, 3 * 7 + 1)
    rgb_last = np.random.default_rng(0).random((4, 4, 6, 3))  # channels last
    assert viz.image_grid(rgb_last, nrow=2, scale=3).shape == (3 * (2 * 5 + 1), 3 * (2 * 7 + 1), 3)
    assert viz.image_grid(np.zeros((2, 4, 4)), pad=0).shape == (4, 8)  # (N, H, W)
    with pytest.raises(ValueError):
        viz.image_grid(np.zeros((4, 4)))


def test_save_image_grid_scales_channels_last_by_its_spatial_size(tmp_path):
    # 8x8 RGB images, channels last: the scale comes from 8 pixels, not from the 3 channels
    images = np.random.default_rng(0).random((6, 8, 8, 3)).astype(np.float32)
    path = viz.save_image_grid(images, tmp_path / "sub" / "grid.png", nrow=3)
    assert png_size(path) == grid_size(6, 8, 8, 3, scale=8)
    with Image.open(path) as img:
        assert img.mode == "RGB"
    chw = viz.save_image_grid(images.transpose(0, 3, 1, 2), tmp_path / "chw.png", nrow=3)
    assert Image.open(chw).tobytes() == Image.open(path).tobytes()
    assert png_size(viz.save_image_grid(np.zeros((1, 64, 64)), tmp_path / "big.png")) == (66, 66)


def _splits(n=40, shape=(1, 8, 8), labels=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    test = torch.rand(n, *shape, generator=g)
    y = torch.randint(0, 10, (n,), generator=g) if labels else None
    return types.SimpleNamespace(train=test, test=test, train_labels=y, test_labels=y, name="synthetic")


def _metrics_csv(path, test_columns=True):
    header = "epoch,step,train_loss,train_recon,train_kl,epoch_time_s"
    rows = ["1,10,50.0,45.0,5.0,0.5", "2,20,40.0,36.0,4.0,0.4", "3,30,35.0,31.0,4.0,0.4"]
    if test_columns:
        header += ",test_neg_elbo,test_recon,test_kl"
        rows = [rows[0] + ",,,", rows[1] + ",41.0,37.0,4.0", rows[2] + ",36.0,32.0,4.0"]
    path.write_text("\n".join([header, *rows]) + "\n")


@pytest.mark.parametrize(
    "spec",
    [
        {"model": "mlp", "latent_dim": 2},
        {"model": "conv", "latent_dim": 3},
        {"model": "mlp", "latent_dim": 2, "kind": "ae"},
        {"model": "mlp", "latent_dim": 4, "likelihood": "gaussian"},
    ],
    ids=["mlp-2d", "conv-3d", "ae-2d", "gaussian-4d"],
)
def test_write_run_pictures(tmp_path, spec):
    torch.manual_seed(0)
    model = build_model({"data_shape": [1, 8, 8], "hidden_dim": 16, **spec})
    model.train()
    _metrics_csv(tmp_path / "metrics.csv")
    paths = viz.write_run_pictures(tmp_path, model, _splits())
    names = [p.name for p in paths]
    expected = ["samples.png", "reconstructions.png", "interpolation.png"]
    expected += ["latent_scatter.png"] if spec["latent_dim"] == 2 else []
    assert names == expected + ["loss_curves.png"]
    assert all(p.parent == tmp_path and p.is_file() for p in paths)
    assert (tmp_path / "latent_scatter.png").exists() == (spec["latent_dim"] == 2)
    assert model.training  # mode restored
    scale = 8  # 8x8 images are enlarged to 64 pixels
    assert png_size(tmp_path / "samples.png") == grid_size(viz.N_SAMPLES, 8, 8, viz.SAMPLES_NROW, scale)
    assert png_size(tmp_path / "reconstructions.png") == grid_size(
        2 * viz.N_RECONSTRUCTIONS, 8, 8, viz.RECONSTRUCTIONS_NROW, scale
    )
    cols = viz.INTERP_STEPS + 2
    assert png_size(tmp_path / "interpolation.png") == grid_size(viz.INTERP_ROWS * cols, 8, 8, cols, scale)
    assert png_size(tmp_path / "loss_curves.png") == tuple(int(s * viz.DPI) for s in viz.LOSS_SIZE_IN)
    if spec["latent_dim"] == 2:
        assert png_size(tmp_path / "latent_scatter.png") == tuple(int(s * viz.DPI) for s in viz.SCATTER_SIZE_IN)


def test_reconstructions_show_originals_on_top(tmp_path):
    model = build_model({"data_shape": [1, 8, 8], "hidden_dim": 8, "latent_dim": 2})
    splits = _splits(n=5)
    path = viz.save_reconstructions(model, splits.test, tmp_path / "r.png", n=4, nrow=4)
    grid = np.asarray(Image.open(path))
    expected = viz.image_grid(splits.test[:4].numpy(), nrow=4, scale=8)
    top = expected.shape[0]  # one grid row of originals (plus the top padding)
    assert np.array_equal(grid[: top - 8], expected[: top - 8])


def test_reconstructions_of_a_small_test_split_keep_whole_rows(tmp_path):
    """28 test images and rows of 8: 24 originals in three whole rows, their reconstructions in
    the next three (28 filled three and a half rows, the reconstructions starting mid-row)."""
    model = build_model({"data_shape": [1, 8, 8], "hidden_dim": 8, "latent_dim": 2})
    test = _splits(n=28).test
    path = viz.save_reconstructions(model, test, tmp_path / "r.png")
    grid = np.asarray(Image.open(path))
    expected = viz.image_grid(test[:24].numpy(), nrow=8, scale=8)
    assert grid.shape[1] == expected.shape[1] and grid.shape[0] == 2 * expected.shape[0] - 8  # one shared pad
    assert np.array_equal(grid[: expected.shape[0] - 8], expected[: expected.shape[0] - 8])
    few = viz.save_reconstructions(model, test[:5], tmp_path / "few.png")  # under a row: 5 above 5
    assert np.asarray(Image.open(few)).shape == viz.image_grid(np.zeros((10, 1, 8, 8), np.float32), nrow=5,
                                                               scale=8).shape


def test_pictures_are_repeatable_and_need_no_metrics_or_labels(tmp_path):
    model = build_model({"data_shape": [1, 8, 8], "hidden_dim": 8, "latent_dim": 2})
    first = viz.write_run_pictures(tmp_path / "a", model, _splits(labels=False), seed=3)
    second = viz.write_run_pictures(tmp_path / "b", model, _splits(labels=False), seed=3)
    assert [p.name for p in first] == ["samples.png", "reconstructions.png", "interpolation.png", "latent_scatter.png"]
    for a, b in zip(first, second):
        if a.name != "latent_scatter.png":  # matplotlib output may embed metadata
            assert Image.open(a).tobytes() == Image.open(b).tobytes()


def test_pictures_fall_back_to_train_images_and_reject_no_images(tmp_path):
    model = build_model({"data_shape": [1, 8, 8], "hidden_dim": 8, "latent_dim": 4})
    splits = _splits()
    splits.test = splits.test[:0]
    assert len(viz.write_run_pictures(tmp_path, model, splits)) == 3
    splits.train = splits.train[:0]
    with pytest.raises(FastVAEError, match="empty"):
        viz.write_run_pictures(tmp_path, model, splits)


def test_loss_curves_without_metrics_or_test_columns(tmp_path):
    assert viz.save_loss_curves(tmp_path / "metrics.csv", tmp_path / "curves.png") is None
    _metrics_csv(tmp_path / "metrics.csv", test_columns=False)
    path = viz.save_loss_curves(tmp_path / "metrics.csv", tmp_path / "curves.png")
    assert png_size(path) == (1200, 400)
    columns = run_folder.metric_columns(run_folder.read_metrics(tmp_path / "metrics.csv"))
    assert columns["train_loss"] == [50.0, 40.0, 35.0]


def test_latent_scatter_needs_two_dims(tmp_path):
    model = build_model({"data_shape": [1, 8, 8], "hidden_dim": 8, "latent_dim": 3})
    with pytest.raises(FastVAEError, match="2-D"):
        viz.save_latent_scatter(model, _splits().test, tmp_path / "s.png")


def test_missing_matplotlib_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(FastVAEError, match="pip install matplotlib"):
        viz._pyplot()


def test_make_loggers(tmp_path, monkeypatch):
    assert viz.make_loggers(tmp_path, tensorboard=False) == []
    from lightning_fabric.loggers import tensorboard as tb

    monkeypatch.setattr(tb, "_TENSORBOARD_AVAILABLE", False)
    monkeypatch.setattr(tb, "_TENSORBOARDX_AVAILABLE", False)
    with pytest.raises(FastVAEError, match="pip install tensorboard"):
        viz.make_loggers(tmp_path, tensorboard=True)
    monkeypatch.setattr(tb, "_TENSORBOARD_AVAILABLE", True)
    (logger,) = viz.make_loggers(tmp_path, tensorboard=True)
    assert isinstance(logger, tb.TensorBoardLogger)
    assert logger.log_dir.rstrip("/") == str(tmp_path / "tensorboard")
