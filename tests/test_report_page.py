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
                   "## Timing", "total training time | 2.00 s", "mean epoch time | 1.00 s",
                   "Left out: downsample, latent_channels, width"):  # the convkl model's settings
        assert needle in text, needle
    assert "| downsample |" not in text and "| width |" not in text
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert links == ["samples.png", "reconstructions.png", "interpolation.png",
                     "latent_scatter.png", "loss_curves.png"]
    assert all((run / link).is_file() for link in links)
    # images.npy has no labels: its scatter has one colour, and the caption says no more
    assert "Latent means of the test images." in text and "coloured by label" not in text
    assert "(6 images)" in text
    # numbers: the metric rows hold finite values and the KL dims add up to the KL row
    value = {m.group(1): float(m.group(2)) for m in re.finditer(r"^\| (-ELBO|KL|reconstruction) \| ([-\d.]+) \|", text, re.M)}
    assert value["-ELBO"] == pytest.approx(value["reconstruction"] + value["KL"], abs=2e-4)
    kl_sum = float(re.search(r"^\| sum \| ([-\d.]+) \|", text, re.M).group(1))
    assert kl_sum == pytest.approx(value["KL"], abs=2e-4)


def test_report_describes_the_checkpoint_not_an_edited_config_json(tmp_path):
    run = make_run(tmp_path / "run", latent_dim=2)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "hidden_dim": 64, "latent_dim": 9}))
    text = write_report(run, iwae_k=0).read_text()
    assert "| latent_dim | 2 |" in text and "| hidden_dim | 16 |" in text and "| latent_dim | 9 |" not in text


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
    assert cli.main(["report", str(run), "--iwae-k", "4", "--html", "--quiet"]) == 0
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
    with pytest.raises(FastVAEError, match="does not exist") as given:  # the user's own --data
        write_report(run, data=str(tmp_path / "no-such-data.npy"))
    assert "pass --data" not in str(given.value)
    (tmp_path / "images.npy").unlink()  # the run's data gone: how to point at another copy
    with pytest.raises(FastVAEError, match="pass --data"):
        write_report(run)
    (run / "config.json").write_text("{broken")
    with pytest.raises(FastVAEError, match="config.json"):
        write_report(run)


def test_report_out_must_be_a_page_and_writable_before_evaluating(tmp_path, capsys, monkeypatch):
    run = make_run(tmp_path / "run")
    checkpoint = (run / LAST).read_bytes()
    for name in ("checkpoints/last.ckpt", "config.json", "samples.png", "report.txt"):
        assert cli.main(["report", str(run), "--iwae-k", "0", "--out", str(run / name)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and ".md" in err[0] and ".html" in err[0], err
    assert (run / LAST).read_bytes() == checkpoint and json.loads((run / "config.json").read_text())
    assert cli.main(["report", str(run), "--iwae-k", "0", "--html", "--out", str(tmp_path / "x.md")]) == 2
    assert "x.md names a Markdown file but HTML was asked for: end it in .html" in capsys.readouterr().err
    import fastvae.report_page as report_page

    def no_evaluation(*args, **kwargs):
        raise AssertionError("evaluated before checking --out")

    monkeypatch.setattr(report_page, "_evaluate", no_evaluation)
    (tmp_path / "file").write_text("a file where a folder goes")
    assert cli.main(["report", str(run), "--out", str(tmp_path / "file" / "r.md")]) == 2
    assert "file" in capsys.readouterr().err


def test_report_redraws_pictures_of_another_checkpoint_seed_or_data(tmp_path):
    """Pictures carry a stamp of what they show (pictures.json); a report redraws them when the
    checkpoint, metrics.csv, seed or data changed instead of showing the old ones."""
    run = make_run(tmp_path / "run")
    write_report(run, iwae_k=0)
    drawn = {p.name: p.read_bytes() for p in run.glob("*.png")}
    stamp = json.loads((run / "pictures.json").read_text())
    assert stamp["seed"] == 0 and stamp["checkpoint"][0] == "checkpoints/last.ckpt"
    written = {p.name: p.stat().st_mtime_ns for p in run.glob("*.png")}
    write_report(run, iwae_k=0)  # nothing changed: kept (the same files, not rewritten)
    assert {p.name: p.stat().st_mtime_ns for p in run.glob("*.png")} == written
    assert json.loads((run / "pictures.json").read_text()) == stamp

    # a resumed run trained on (--no-pictures): new weights and metrics.csv rows
    state = torch.load(run / LAST, weights_only=True)
    state["model"] = {k: v + 0.5 if v.is_floating_point() else v for k, v in state["model"].items()}
    state["epoch"], state["step"] = 3, 72
    save_checkpoint(run / LAST, {k: v for k, v in state.items() if k != "format"})
    with open(run / "metrics.csv", "a") as f:
        f.write("3,72,30.0,28.0,2.0,0.5,29.0,27.0,2.0\n")
    write_report(run, iwae_k=0)
    redrawn = {p.name: p.read_bytes() for p in run.glob("*.png")}
    assert redrawn["samples.png"] != drawn["samples.png"]
    assert redrawn["loss_curves.png"] != drawn["loss_curves.png"]

    write_report(run, iwae_k=0, seed=5)  # another seed: other sampled pictures
    assert (run / "samples.png").read_bytes() != redrawn["samples.png"]
    assert json.loads((run / "pictures.json").read_text())["seed"] == 5
    write_report(run, iwae_k=0)  # back to the run's seed: its pictures again
    assert (run / "samples.png").read_bytes() == redrawn["samples.png"]

    other = tmp_path / "other.npy"
    np.save(other, np.random.default_rng(1).integers(0, 256, (40, 8, 8), dtype=np.uint8))
    text = write_report(run, iwae_k=0, data=str(other)).read_text()
    assert f"data `{other}` (the run was trained on `{tmp_path / 'images.npy'}`)" in text
    assert (run / "reconstructions.png").read_bytes() != redrawn["reconstructions.png"]


def test_report_streams_a_prepared_test_split_beyond_the_picture_sample(tmp_path):
    """A prepared test split larger than the pictures' in-memory sample: PSNR and latent
    statistics cover every test image (the KL dims add up to the evaluated KL)."""
    from fastvae.image_quality import psnr, reconstructions
    from fastvae.loaders import PICTURE_EXAMPLES, head
    from fastvae.shards import open_dataset, prepare

    images = tmp_path / "many.npy"
    np.save(images, np.random.default_rng(2).integers(0, 256, (2200, 8, 8), dtype=np.uint8))
    prepare(str(images), tmp_path / "shards", workers=0, progress=False, test_fraction=0.6)
    test = open_dataset(str(tmp_path / "shards")).test
    assert len(test) > PICTURE_EXAMPLES
    run = make_run(tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    config["data"] = str(tmp_path / "shards")
    (run / "config.json").write_text(json.dumps(config))

    text = write_report(run, iwae_k=0).read_text()
    value = {m.group(1): float(m.group(2)) for m in
             re.finditer(r"^\| (KL|reconstruction PSNR \(dB\)) \| ([-\d.]+) \|", text, re.M)}
    model = __import__("fastvae").load(run)
    x, _ = head(test, len(test))
    assert len(x) == len(test)
    assert value["reconstruction PSNR (dB)"] == pytest.approx(psnr(reconstructions(model, x), x), abs=1e-4)
    kl_sum = float(re.search(r"^\| sum \| ([-\d.]+) \|", text, re.M).group(1))
    assert kl_sum == pytest.approx(value["KL"], abs=2e-4)
    assert f"{len(test)} test images" in text


def test_report_text_from_the_user_is_escaped_and_links_resolve(tmp_path):
    from urllib.parse import unquote

    run = make_run(tmp_path / "odd#1 50%`<b>*x*")
    md = write_report(run, tmp_path / "pages" / "r.md", iwae_k=0).read_text()
    assert md.splitlines()[0] == "# fastvae run report: odd\\#1 50%\\`\\<b\\>\\*x\\*"
    assert f"Run folder ``{run}``" in md  # fenced by two backticks: the name holds one
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert "#" not in link and "`" not in link
        assert (tmp_path / "pages" / unquote(link)).resolve().is_file(), link
    html = write_report(run, tmp_path / "pages" / "r.html", iwae_k=0).read_text()
    assert "<b>" not in html and f"<code>{run}</code>".replace("<b>", "&lt;b&gt;") in html
    for link in re.findall(r'<img src="([^"]+)"', html):
        assert (tmp_path / "pages" / unquote(link)).resolve().is_file(), link


def test_autoencoder_report_speaks_of_codes_and_squared_error(tmp_path):
    run = make_run(tmp_path / "run", kind="ae")
    text = write_report(run, iwae_k=0).read_text()
    assert "Nats per example" not in text and "Squared error per example" in text
    assert "z ~ N(0, I)" not in text and "Gaussian fitted to the test images' codes" in text
    assert "p(x|z" not in text.split("## Pictures")[1]


def test_report_audit_pages_elsewhere_header_only_metrics_and_autoencoder_curves(tmp_path, capsys, monkeypatch):
    """A page written elsewhere with another seed replaced the run's pictures without a word; an
    --out root may not write (/proc) was found after the evaluation, and a refused report left
    the folders made for its --out; a metrics.csv holding its header alone (Ctrl-C before the
    first epoch) redrew every picture on every report; an autoencoder's curves were titled -ELBO
    and KL in nats."""
    import os

    import fastvae.viz as viz

    run = make_run(tmp_path / "run")
    write_report(run, iwae_k=0)
    capsys.readouterr()
    write_report(run, iwae_k=0, seed=3, out=tmp_path / "elsewhere" / "s3.md")
    assert f"note: {run}'s pictures now show seed 3" in capsys.readouterr().err
    write_report(run, iwae_k=0, seed=3, out=tmp_path / "elsewhere" / "again.md")  # already shown: no note
    assert "note:" not in capsys.readouterr().err
    if os.path.isdir("/proc/self"):
        with pytest.raises(FastVAEError, match="cannot write into /proc"):
            write_report(run, iwae_k=0, out="/proc/report.md")
    with pytest.raises(FastVAEError):
        write_report(run, iwae_k=0, data=str(tmp_path / "missing.npy"), out=tmp_path / "new1" / "new2" / "r.md")
    assert not (tmp_path / "new1").exists()

    early = make_run(tmp_path / "early", metrics=False)
    (early / "metrics.csv").write_text(METRICS_CSV.splitlines()[0] + "\n")  # the header alone
    write_report(early, iwae_k=0)
    written = {p.name: p.stat().st_mtime_ns for p in early.glob("*.png")}
    write_report(early, iwae_k=0)
    assert {p.name: p.stat().st_mtime_ns for p in early.glob("*.png")} == written and "loss_curves.png" not in written

    titles = []
    real_save = viz._save_figure
    monkeypatch.setattr(viz, "_save_figure", lambda fig, path: titles.append(
        [(ax.get_title(), ax.get_ylabel()) for ax in fig.axes]) or real_save(fig, path))
    viz.save_loss_curves(early.parent / "run" / "metrics.csv", tmp_path / "ae.png", kind="ae")
    viz.save_loss_curves(early.parent / "run" / "metrics.csv", tmp_path / "vae.png")
    assert titles[0] == [("loss (squared error)", "squared error per example")]
    assert [t for t, _ in titles[1]] == ["loss (-ELBO)", "reconstruction", "KL"]


def test_a_learned_sigma_is_reported(tmp_path):
    """A --learn-sigma run's report showed only the starting --sigma."""
    run = make_run(tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    config.update(likelihood="gaussian", learn_sigma=True, sigma=0.1)
    torch.manual_seed(0)
    model = build_model(TrainConfig(**{k: v for k, v in config.items()}).model_spec((1, 8, 8)))
    with torch.no_grad():
        model.likelihood.log_scale.fill_(np.log(0.25))  # as if learned
    (run / "config.json").write_text(json.dumps(config))
    save_checkpoint(run / LAST, {"config": config, "spec": model.spec, "model": model.state_dict(), "epoch": 2,
                                 "step": 48})
    text = write_report(run, iwae_k=0).read_text()
    assert re.search(r"\| learned sigma \| 0\.2500 \|", text), text
    assert "learned sigma" not in write_report(make_run(tmp_path / "fixed"), iwae_k=0).read_text()


def test_report_names_its_run_folder_absolutely_and_refuses_an_empty_one(tmp_path, monkeypatch, capsys):
    """Written from inside the run folder to a page elsewhere, the page said "Run folder `.`";
    an empty RUN was read as the current folder."""
    run = make_run(tmp_path / "run")
    monkeypatch.chdir(run)
    text = write_report(".", iwae_k=0, out=tmp_path / "page.md").read_text()
    assert f"Run folder `{run}`" in text
    assert cli.main(["report", "", "--iwae-k", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the run folder is empty" in err[0], err
