"""``fastvae report``: latent statistics, the report page, its pictures and its errors."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from torch import nn

from fastvae import cli
from fastvae.checkpoint import save_checkpoint
from fastvae.run_folder import LAST
from fastvae.config import TrainConfig
from fastvae.errors import FastVAEError
from fastvae.models import build_model
from fastvae.report_page import latent_stats, write_report

METRICS_CSV = (
    "epoch,step,train_loss,train_recon,train_kl,epoch_time_s,test_neg_elbo,test_recon,test_kl\n"
    "1,24,40.5,38.0,2.5,1.5,39.0,37.0,2.0\n"
    "2,48,35.0,32.0,3.0,0.5,34.0,31.5,2.5\n"
)


def make_run(folder, latent_dim=2, kind="vae", metrics=True):
    """A run folder as ``fastvae train`` leaves it (tiny MLP, 60 8x8 images), without training."""
    data = folder.parent / "images.npy"
    np.save(data, np.random.default_rng(0).integers(0, 256, (60, 8, 8), dtype=np.uint8))
    config = TrainConfig(data=str(data), latent_dim=latent_dim, hidden_dim=16, kind=kind, epochs=2,
                         out=str(folder))
    torch.manual_seed(0)
    model = build_model(config.model_spec((1, 8, 8)))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    if metrics:
        (folder / "metrics.csv").write_text(METRICS_CSV)
    save_checkpoint(folder / LAST, {"config": config.to_dict(), "spec": model.spec,
                                    "model": model.state_dict(), "epoch": 2, "step": 48})
    return folder


class FixedEncoder(nn.Module):
    """encode(x) = (x[:, :3] * (10, 1, 0.01), logvar = 0): known activity and KL per dim."""

    latent_dim = 3

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([10.0, 1.0, 0.01]))

    def encode(self, x):
        mu = x.flatten(1)[:, :3] * self.scale
        return mu, torch.zeros_like(mu)


def test_latent_stats_kl_per_dim_and_active_units():
    x = torch.rand(500, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    stats = latent_stats(FixedEncoder(), x, batch_size=64)
    mu = x.flatten(1)[:, :3].double() * torch.tensor([10.0, 1.0, 0.01], dtype=torch.float64)
    expected_var = mu.var(0, unbiased=False)
    assert stats["activity"] == pytest.approx(expected_var.tolist(), rel=1e-6)
    # U(0,1) has variance 1/12: dims 0 (x100) and 1 (x1) are active, dim 2 (x1e-4) is not
    assert stats["active_units"] == 2 and stats["latent_dim"] == 3
    assert stats["kl_per_dim"] == pytest.approx((0.5 * mu.pow(2)).mean(0).tolist(), rel=1e-6)


def test_latent_stats_sum_to_the_kl_term():
    from fastvae.distributions import kl_standard_normal

    model = build_model({"data_shape": [1, 8, 8], "hidden_dim": 16, "latent_dim": 5}).train()
    x = torch.rand(64, 1, 8, 8)
    stats = latent_stats(model, x)
    with torch.no_grad():
        mu, logvar = model.encode(x)
        kl = kl_standard_normal(mu, logvar).mean().item()
    assert sum(stats["kl_per_dim"]) == pytest.approx(kl, rel=1e-5)
    assert model.training
    ae = build_model({"data_shape": [1, 8, 8], "hidden_dim": 16, "latent_dim": 5, "kind": "ae"})
    assert latent_stats(ae, x)["kl_per_dim"] is None


def test_report_lists_metrics_and_links_pictures(tmp_path):
    run = make_run(tmp_path / "run", latent_dim=2)
    path = write_report(run, iwae_k=8)
    assert path == run / "report.md"
    text = path.read_text()
    for needle in ("-ELBO", "IWAE NLL (K = 8)", "reconstruction", "| KL |", "active units",
                   "KL (nats)", "Cov_x(E_q[z_u])", "## Configuration", "| latent_dim | 2 |",
                   "## Timing", "total training time | 2.00 s", "mean epoch time | 1.00 s"):
        assert needle in text, needle
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert links == ["samples.png", "reconstructions.png", "interpolation.png",
                     "latent_scatter.png", "loss_curves.png"]
    assert all((run / link).is_file() for link in links)
    # numbers: the metric rows hold finite values and the KL dims add up to the KL row
    value = {m.group(1): float(m.group(2)) for m in re.finditer(r"^\| (-ELBO|KL|reconstruction) \| ([-\d.]+) \|", text, re.M)}
    assert value["-ELBO"] == pytest.approx(value["reconstruction"] + value["KL"], abs=2e-4)
    kl_sum = float(re.search(r"^\| sum \| ([-\d.]+) \|", text, re.M).group(1))
    assert kl_sum == pytest.approx(value["KL"], abs=2e-4)


def test_report_html_elsewhere_and_no_scatter_for_8d(tmp_path):
    run = make_run(tmp_path / "run", latent_dim=8, metrics=False)
    (run / "latent_scatter.png").write_bytes(b"left from another run")
    out = write_report(run, tmp_path / "pages" / "page.html", iwae_k=0)
    text = out.read_text()
    assert text.startswith("<!DOCTYPE html>")
    assert '<img src="../run/samples.png"' in text and "latent_scatter" not in text
    assert "loss_curves" not in text and "IWAE" not in text  # no metrics.csv, IWAE skipped
    assert "<td>active units</td>" in text and "6 test images of shape 1x8x8" in text


def test_report_of_the_autoencoder_baseline(tmp_path):
    run = make_run(tmp_path / "run", latent_dim=2, kind="ae")
    text = write_report(run, iwae_k=8).read_text()
    assert "| MSE |" in text and "IWAE" not in text and "KL (nats)" not in text
    assert "active units" in text


def test_report_command(tmp_path, capsys):
    run = make_run(tmp_path / "run", latent_dim=3)
    assert cli.main(["report", str(run), "--iwae-k", "4", "--html", "--no-progress"]) == 0
    assert capsys.readouterr().out.strip() == str(run / "report.html")
    assert (run / "samples.png").is_file() and not (run / "latent_scatter.png").exists()


def test_report_errors(tmp_path, capsys):
    missing = tmp_path / "nope"
    with pytest.raises(FastVAEError, match="does not exist"):
        write_report(missing)
    assert cli.main(["report", str(missing)]) == 2
    assert "run folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(FastVAEError, match="train into it first"):
        write_report(tmp_path / "empty")
    run = make_run(tmp_path / "run")
    with pytest.raises(FastVAEError, match="iwae-k"):
        write_report(run, iwae_k=-1)
    with pytest.raises(FastVAEError, match="--data"):
        write_report(run, data=str(tmp_path / "no-such-data.npy"))
    (run / "config.json").write_text("{broken")
    with pytest.raises(FastVAEError, match="config.json"):
        write_report(run)
