"""The spatial-latent conv VAE (``--model convkl``): shapes, refusals, gradients against
finite differences, the fused kernel on the flattened latent, ONNX parity at two latent sizes,
tiled decoding, DDP, resume, and the commands end to end. Models are tiny (width 4)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastvae.config import TrainConfig
from fastvae.data import Splits
from fastvae.errors import FastVAEError
from fastvae.models import build_model
from fastvae.models.convkl import LOGVAR_MAX, LOGVAR_MIN, flatten_latent, unflatten_latent

from testkit import assert_one_line_error, max_weight_diff, run_cli, state_dict_of

TINY = dict(model="convkl", width=4, channel_mult="", blocks_per_level=1, likelihood="gaussian", sigma=0.1)
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def tiny_model(shape=(3, 16, 16), seed=0, **overrides):
    """A tiny convkl VAE whose zero-initialised output convolutions are randomised, so every
    path (not only the image skip) shapes the outputs."""
    torch.manual_seed(seed)
    model = build_model({**TINY, "data_shape": list(shape), **overrides})
    with torch.no_grad():
        for conv in (model.encoder.conv_out, model.decoder.conv_out):
            conv.weight.normal_(0.0, 0.1)
    return model.eval()


def tiny_splits(n_train=64, n_test=16, size=16, seed=0) -> Splits:
    g = torch.Generator().manual_seed(seed)
    smooth = torch.nn.functional.interpolate(torch.rand(n_train + n_test, 3, size // 4, size // 4, generator=g),
                                             size=(size, size), mode="bilinear", align_corners=False)
    return Splits("tiny-photos", smooth[:n_train].contiguous(), smooth[n_train:].contiguous())


@pytest.mark.parametrize("f", [2, 4, 8])
@pytest.mark.parametrize("c", [1, 4])
def test_shapes_for_every_f_and_c(f, c):
    model = tiny_model(downsample=f, latent_channels=c, attention=True)
    x = torch.rand(2, 3, 16, 16)
    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (2, c, 16 // f, 16 // f)
    assert model.latent_shape == (c, 16 // f, 16 // f) and model.latent_dim == c * (16 // f) ** 2
    out = model.posterior(x)
    assert out.z.shape == mu.shape and out.kl.shape == (2,) and out.params.shape == x.shape
    # fully convolutional decoder: any latent height and width
    assert model.decode(torch.randn(3, c, 5, 3)).shape == (3, 3, 5 * f, 3 * f)
    assert model.sample(2).shape == (2, 3, 16, 16)
    assert torch.isfinite(model(x).loss)


def test_kl_is_over_every_latent_dim_and_logvar_is_clamped():
    model = tiny_model()
    x = torch.rand(3, 3, 16, 16)
    mu, logvar = model.encode(x)
    out = model.posterior(x)
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(mu, (0.5 * logvar).exp()), torch.distributions.Normal(0.0, 1.0))
    torch.testing.assert_close(out.kl, expected.flatten(1).sum(1), rtol=1e-5, atol=1e-4)
    with torch.no_grad():
        model.encoder.conv_out.bias[4:] = 1e4  # a huge logvar: clamped before any exp
    logvar = model.encode(x)[1]
    assert logvar.max() == LOGVAR_MAX and torch.isfinite(model(x).loss)
    with torch.no_grad():
        model.encoder.conv_out.bias[4:] = -1e4
    assert model.encode(x)[1].min() == LOGVAR_MIN


def test_flatten_latent_is_a_view_in_memory_order():
    t = torch.randn(2, 4, 3, 5)
    for layout in (t, t.contiguous(memory_format=torch.channels_last)):
        flat = flatten_latent(layout)
        assert flat.shape == (2, 60) and flat.data_ptr() == layout.data_ptr()
        back = unflatten_latent(flat, layout)
        assert torch.equal(back, t) and back.stride() == layout.stride()


@pytest.mark.parametrize("image_skip", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_the_noise_scales_each_latent_by_its_own_logvar_in_either_layout(image_skip, channels_last):
    """A channels_last model without the image skip (the trainer's layout on CUDA) flattened mu
    (a chunk of the last conv's output) and logvar (clamped: dense channels_last) each in its
    own order: z at one position took the scale of logvar at another. z - mu, divided by each
    position's own exp(logvar / 2), must give back the drawn noise, in one of the two orders."""
    model = tiny_model(image_skip=image_skip)
    model.reparam_backend = "torch"
    c = model.latent_shape[0]
    with torch.no_grad():  # scales that differ by channel, so a mispairing cannot hide
        model.encoder.conv_out.bias[c:] = torch.linspace(-4.0, 4.0, c)
    x = torch.rand(3, 3, 16, 16)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    out = model.posterior(x, torch.Generator().manual_seed(5))
    drawn = torch.randn(3, model.latent_dim, generator=torch.Generator().manual_seed(5))
    recovered = ((out.z - out.mu) / torch.exp(0.5 * out.logvar)).detach()
    b, c, h, w = recovered.shape
    orders = {"nchw": drawn.view(b, c, h, w), "nhwc": drawn.view(b, h, w, c).permute(0, 3, 1, 2)}
    assert any(torch.allclose(recovered, eps, rtol=1e-4, atol=1e-4) for eps in orders.values()), (
        [(recovered - eps).abs().max().item() for eps in orders.values()])
    mu, sigma = out.mu.detach().flatten(1), torch.exp(0.5 * out.logvar.detach()).flatten(1)
    kl = torch.distributions.kl_divergence(torch.distributions.Normal(mu, sigma), torch.distributions.Normal(0.0, 1.0))
    torch.testing.assert_close(out.kl.detach(), kl.sum(1), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("likelihood", ["gaussian", "laplace", "bernoulli"])
def test_likelihoods_match_torch_distributions(likelihood):
    model = tiny_model(likelihood=likelihood, learn_sigma=likelihood != "bernoulli")
    params, x = torch.randn(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    scale = model.likelihood.log_scale.exp()
    dist = {"gaussian": lambda: torch.distributions.Normal(params, scale),
            "laplace": lambda: torch.distributions.Laplace(params, scale),
            "bernoulli": lambda: torch.distributions.ContinuousBernoulli(logits=params)}[likelihood]()
    if likelihood == "bernoulli":  # BCE on [0, 1] targets: the Bernoulli pmf formula, unnormalized
        expected = (x * torch.nn.functional.logsigmoid(params) + (1 - x) * torch.nn.functional.logsigmoid(-params))
    else:
        expected = dist.log_prob(x)
    torch.testing.assert_close(model.likelihood.log_prob(params, x), expected.flatten(1).sum(1), rtol=1e-5, atol=1e-3)


def test_odd_image_sizes_are_refused():
    with pytest.raises(FastVAEError, match="18x16 pixels do not divide by --downsample 4"):
        build_model({**TINY, "data_shape": [3, 18, 16], "downsample": 4})
    build_model({**TINY, "data_shape": [3, 18, 16], "downsample": 2})  # 18 and 16 divide by 2
    with pytest.raises(FastVAEError, match=r"at least 2x2 pixels .* shape \(1, 1, 16\): for rows of numbers use --model mlp"):
        build_model({**TINY, "data_shape": [1, 1, 16], "downsample": 2})  # said "resize to 0x16"
    with pytest.raises(FastVAEError, match="--channel-mult"):
        TrainConfig(model="convkl", downsample=8, channel_mult="1,2").validate()


def test_channel_mult_as_a_config_files_array(tmp_path):
    """channel_mult = [1, 2, 2] in TOML (or JSON) is the string "1,2,2"; an array of
    non-integers stays a one-line refusal."""
    from fastvae.config import load_config_file

    (tmp_path / "c.toml").write_text('model = "convkl"\ndownsample = 4\nchannel_mult = [1, 2, 2]\n')
    config = TrainConfig.from_dict(load_config_file(tmp_path / "c.toml")).validate()
    assert config.channel_mult == "1,2,2"
    with pytest.raises(FastVAEError, match="setting 'channel_mult' must be a string"):
        TrainConfig.from_dict({"channel_mult": [1.5, 2, 2]})


def test_encoder_and_decoder_gradients_match_finite_differences_in_fp64():
    """gradcheck of the whole -ELBO (fixed noise) w.r.t. the image and w.r.t. weights of the
    first and last layers, in float64: autograd through GroupNorm, SiLU, attention, the
    strided and upsampling convs, the bicubic skip and the KL."""
    model = tiny_model(shape=(3, 8, 8), downsample=2, attention=True).double()
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    target = torch.rand(1, 3, 8, 8, dtype=torch.float64)
    eps = torch.randn(1, *model.latent_shape, dtype=torch.float64)
    params = dict(model.named_parameters())
    names = ["encoder.conv_in.weight", "encoder.mid.1.qkv.bias", "decoder.up.0.conv1.weight", "decoder.skip.weight"]

    def neg_elbo(image, *weights):
        with torch.nn.utils.stateless._reparametrize_module(model, dict(zip(names, weights))):
            mu, logvar = model.encoder(image)
            z = mu + (0.5 * logvar).exp() * eps
            kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).flatten(1).sum(1)
            # the Gaussian NLL by hand: fastvae's likelihoods compute in fp32 (tested above)
            nll = (0.5 * ((target - model.decoder(z)) / 0.1) ** 2).flatten(1).sum(1)
            return nll + kl

    weights = [params[n].detach().clone().requires_grad_(True) for n in names]
    # fast mode: random directional derivatives (v^T J u) instead of every column of J
    assert torch.autograd.gradcheck(neg_elbo, (x, *weights), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


@pytest.mark.skipif(not INTERPRETED, reason="needs TRITON_INTERPRET=1 before import: test_kernel_path_in_subprocess")
@pytest.mark.parametrize("channels_last", [False, True])
def test_kernel_path_equals_torch_path_on_the_flattened_latent(channels_last):
    from fastvae.kernels import philox_eps
    from fastvae.reparam import reparameterize_kl, reparameterize_kl_reference

    model = tiny_model().train()
    x = torch.rand(3, 3, 16, 16)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    results = {}
    for backend in ("triton", "torch"):
        model.zero_grad()
        mu, logvar = model.encode(x)
        flat_mu, flat_lv = flatten_latent(mu), flatten_latent(logvar)
        torch.manual_seed(7)
        if backend == "triton":
            z, kl = reparameterize_kl(flat_mu, flat_lv, backend="triton")
        else:  # the same Philox noise, through the torch reference
            torch.manual_seed(7)
            seed = int(torch.randint(0, 2**31 - 1, ()))
            z, kl = reparameterize_kl_reference(flat_mu, flat_lv, eps=philox_eps(seed, *flat_mu.shape))
        loss = (model.likelihood.nll(model.decode(unflatten_latent(z, mu)), x) + kl).mean()
        loss.backward()
        results[backend] = (z.detach(), kl.detach(), [p.grad.clone() for p in model.parameters()])
    (zk, klk, gk), (zt, klt, gt) = results["triton"], results["torch"]
    torch.testing.assert_close(zk, zt, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(klk, klt, rtol=1e-5, atol=1e-4)
    for a, b in zip(gk, gt):  # fp32 sums of 768 pixels' terms in another order: relative to the largest
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4 * float(b.abs().max()))


@pytest.mark.skipif(INTERPRETED, reason="already running under the interpreter")
def test_kernel_path_in_subprocess():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-k", "kernel_path_equals"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "2 passed" in proc.stdout, proc.stdout[-2000:]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from fastvae.export import export_decoder
    from fastvae.export.encoder_export import export_encoder

    model = tiny_model(attention=True)
    folder = tmp_path_factory.mktemp("convkl_onnx")
    report = export_decoder(model, folder / "decoder.onnx", fp16=True)
    encoder_report = export_encoder(model, folder / "encoder.onnx")
    return model, report, encoder_report


def test_a_spatial_decoders_calls_are_sized_by_its_working_memory(exported, monkeypatch):
    """A batch of 1000 64x64 images held ~9 GB in onnxruntime (8 activations per full-resolution
    channel and pixel); a 3000x3000 latent was OOM-killed. The default batch keeps a call's
    working memory under WORK_BUDGET, with the same samples as one call, and what cannot fit
    in the free memory is refused in one line."""
    from fastvae.export import OnnxSampler
    from fastvae.export import sampler as sampler_module

    model, report, _ = exported
    sampler = OnnxSampler(report.path, threads=1)
    pixels = math.prod(sampler.output_shape[1:])
    width = json.loads(sampler.metadata["model_spec"])["width"]
    per_row = sampler_module.WORK_BYTES_PER_PIXEL_CHANNEL * width * pixels
    assert sampler.batch_size_for(sampler.latent_shape) == min(1000, sampler_module.WORK_BUDGET // per_row)
    monkeypatch.setattr(sampler_module, "WORK_BUDGET", 2 * per_row)  # two images per call
    small = OnnxSampler(report.path, threads=1)
    calls = []
    monkeypatch.setattr(small, "_run_into", lambda z, out: (calls.append(len(z)), sampler._run_into(z, out)))
    np.testing.assert_array_equal(small.sample(5, seed=3), sampler.sample(5, seed=3, batch_size=5))
    assert calls == [2, 2, 1]
    monkeypatch.setattr("fastvae.config.available_memory", lambda: 64 * 2**20)
    with pytest.raises(FastVAEError, match=r"1 latent of shape \(4, 3000, 3000\) needs about .* GiB .* more "
                                           r"than the memory free here \(0.0625 GiB\): use tiles .*fastvae decode --tile"):
        sampler.decode(np.zeros((1, 4, 3000, 3000), np.float32))  # refused before anything is allocated


def test_a_conv_decoders_rows_depend_on_their_batch_by_float_rounding_at_most(tmp_path):
    """README: the same latents give the same images whatever shares their call - bit for bit on
    one thread; on several, onnxruntime's convolutions may round a row by its call's row count
    (3e-8 seen at the default widths), never more than float rounding."""
    from fastvae.export import OnnxSampler, export_decoder

    torch.manual_seed(0)
    model = build_model({"model": "convkl", "data_shape": [3, 32, 32], "width": 16}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = export_decoder(model, tmp_path / "decoder.onnx").path
    z = np.random.default_rng(0).standard_normal((16, *model.latent_shape)).astype(np.float32)
    for threads in (1, 2):
        sampler = OnnxSampler(path, threads=threads)
        whole = sampler.decode(z)
        for k in (1, 6, 7, 13):
            gap = float(np.abs(whole[:k] - sampler.decode(z[:k])).max())
            assert gap == 0.0 if threads == 1 else gap <= 1e-6, (threads, k, gap)


def test_onnx_decoder_matches_torch_at_two_latent_sizes(exported):
    import onnxruntime as ort

    model, report, _ = exported
    assert set(report.parity) == {"1x4x4x4", "3x4x7x5"} and report.max_abs_error < 1e-5
    session = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    for shape in [(2, 4, 16, 16), (1, 4, 40, 24)]:  # one file, two latent sizes
        z = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
        with torch.inference_mode():
            expected = model.decode(torch.from_numpy(z)).numpy()
        got = session.run(["mean"], {"z": z})[0]
        assert got.shape == (shape[0], 3, shape[2] * 4, shape[3] * 4)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    # fp16: float32 in and out, GroupNorm's InstanceNormalization and Softmax kept in fp32
    import onnx

    half = onnx.load(str(report.variants[0].path))
    assert half.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    fp32_ops = {n.op_type for n in half.graph.node if n.op_type in ("InstanceNormalization", "Softmax")}
    assert fp32_ops == {"InstanceNormalization", "Softmax"}
    types = {t.name: t.data_type for t in half.graph.initializer}
    norm_scales = [n.input[1] for n in half.graph.node if n.op_type == "InstanceNormalization"]
    assert norm_scales and all(types.get(s, onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT for s in norm_scales)
    assert 0 < report.variants[0].max_abs_error_mean < 1e-2


def test_fp16_bernoulli_logits_near_the_clamp_stay_fp32_precise(tmp_path):
    """The Bernoulli skip path's logit(clamp(p, 1e-3, 1 - 1e-3)) ran in fp16, which steps by
    4.9e-4 near 1 (and the latent went through fp16 first): logits near the clamp were off by
    up to ~0.2 (measured on a trained decoder); now its nodes read the fp32 latent and stay
    fp32. Latents that drive most pixels near the clamp: the fp16 logits within 5e-3."""
    import onnxruntime as ort

    from fastvae.export import export_decoder
    from fastvae.models.convkl import SKIP_GAIN

    model = tiny_model(likelihood="bernoulli")
    report = export_decoder(model, tmp_path / "decoder.onnx", fp16=True)
    rng = np.random.default_rng(0)
    # skip latent k = (pixel - 0.5) * SKIP_GAIN: pixels within 2e-3 of 0 and 1, and others
    pixels = rng.choice([0.0005, 0.002, 0.998, 0.9995, 0.3], size=(4, 4, 4, 4)).astype(np.float32)
    z = (pixels - 0.5) * SKIP_GAIN + rng.normal(0, 1e-3, pixels.shape).astype(np.float32)
    full, half = (ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                  for path in (report.path, report.variants[0].path))
    params32, params16 = (session.run(["params"], {"z": z})[0] for session in (full, half))
    assert np.abs(params32).max() > 6  # logits at the clamp (+-6.9) are among them
    np.testing.assert_allclose(params16, params32, atol=5e-3, rtol=0)


def test_exported_graphs_declare_the_shapes_they_make(exported):
    """Tools that trust declared shapes (TensorRT, generated clients) read them: a decoder's
    images are image_height x image_width (f times the latent's), an encoder's latents have c
    fixed channels and their own latent_height x latent_width."""
    import onnx

    model, report, encoder_report = exported

    def declared(values):
        return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in values}

    c = model.latent_shape[0]
    for path in (report.path, report.variants[0].path):
        graph = onnx.load(str(path)).graph
        assert declared(graph.input) == {"z": ["batch", c, "height", "width"]}
        assert declared(graph.output) == {name: ["batch", 3, "image_height", "image_width"]
                                          for name in ("mean", "params")}
    encoder = onnx.load(str(encoder_report.path))
    assert declared(encoder.graph.input) == {"image": ["batch", 3, "height", "width"]}
    assert declared(encoder.graph.output) == {name: ["batch", c, "latent_height", "latent_width"]
                                              for name in ("mu", "logvar")}
    onnx.checker.check_model(encoder, full_check=True)  # the declared shapes agree with inference


def test_exports_that_cannot_work_are_refused_before_writing(tmp_path):
    """An opset too old for the spatial graphs (torch.onnx failed with a page of IR), --int8 of
    a decoder without matrix products with weights (the "int8" file was the fp32 one; with
    attention too, whose products multiply activations), and the encoder of a deterministic
    autoencoder: one FastVAEError each, nothing written."""
    from fastvae.export import export_decoder
    from fastvae.export.encoder_export import export_encoder

    model = tiny_model()  # no attention: convolutions only
    for call, needle in ((lambda: export_decoder(model, tmp_path / "d.onnx", opset=10), "--opset 11"),
                         (lambda: export_encoder(model, tmp_path / "e.onnx", opset=9), "--opset 11"),
                         (lambda: export_decoder(model, tmp_path / "d.onnx", int8=True), "without --int8"),
                         (lambda: export_decoder(tiny_model(attention=True), tmp_path / "a.onnx", int8=True),
                          "without --int8"),
                         (lambda: export_encoder(tiny_model(kind="ae"), tmp_path / "e.onnx"), "--kind ae")):
        with pytest.raises(FastVAEError, match=re.escape(needle)) as info:
            call()
        assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_sampler_and_service_take_spatial_latents(exported):
    """OnnxSampler draws (n, c, h, w) latents and decodes them like torch; the HTTP service's
    /decode parser takes latents of that shape and names it when refusing others."""
    import json

    from fastvae.errors import FastVAEError
    from fastvae.export import OnnxSampler
    from fastvae.export.service_io import BadRequest, Limits, parse_decode

    model, report, _ = exported
    sampler = OnnxSampler(report.path)
    assert sampler.latent_shape == model.latent_shape == (4, 4, 4) and sampler.latent_dim == 64
    z = np.random.default_rng(3).standard_normal((5, 4, 4, 4), dtype=np.float32)
    with torch.inference_mode():
        expected = model.likelihood.mean(model.decode(torch.from_numpy(z))).numpy()
    np.testing.assert_allclose(sampler.decode(z, batch_size=2), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(sampler.sample(5, seed=3), expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(FastVAEError, match=r"\(n, 4, h, w\)"):
        sampler.decode(np.zeros((2, 64), dtype=np.float32))
    body = json.dumps({"z": z[:2].tolist()}).encode()
    parsed, fmt = parse_decode(body, "application/json", None, sampler.latent_shape, Limits())
    np.testing.assert_array_equal(parsed, z[:2])
    assert fmt == "npy"
    with pytest.raises(BadRequest, match=r"\(n, 4, 4, 4\)"):
        parse_decode(json.dumps({"z": [[0.0] * 64]}).encode(), "application/json", None,
                     sampler.latent_shape, Limits())


def test_sampler_and_service_decode_latents_of_any_size(exported):
    """The decoder file takes any latent height and width: so do OnnxSampler.decode (also in
    several batches into one output) and the service's /decode, whose batcher keeps latents of
    other sizes out of each other's batches; another channel count is refused in one line."""
    import asyncio
    import io

    from fastvae.export import OnnxSampler
    from fastvae.export.http_service import Batching
    from testkit import asgi_part, in_process_service

    model, report, _ = exported
    sampler = OnnxSampler(report.path)
    assert sampler.any_latent_size
    spec = json.loads(sampler.metadata["model_spec"])  # only what a convkl model reads
    assert spec["model"] == "convkl" and "latent_channels" in spec and "latent_dim" not in spec and "hidden_dim" not in spec
    rng = np.random.default_rng(4)
    small, odd = (rng.standard_normal(s, dtype=np.float32) for s in ((2, 4, 4, 4), (3, 4, 6, 10)))
    with torch.inference_mode():
        expected = model.likelihood.mean(model.decode(torch.from_numpy(odd))).numpy()
    got = sampler.decode(odd, batch_size=2)
    assert got.shape == (3, 3, 24, 40) and sampler.output_shape_for((4, 6, 10)) == (3, 24, 40)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(FastVAEError, match=r"\(n, 4, h, w\) .*any h, w >= 1; trained at 4x4"):
        sampler.decode(np.zeros((1, 3, 6, 10), dtype=np.float32))

    async def scenario(call, app):  # both in one batcher turn: two batches, one per size
        bodies = [json.dumps({"z": z.tolist()}).encode() for z in (small, odd)]
        answers = await asyncio.gather(*(call("POST", "/decode", [asgi_part(b, more=False)]) for b in bodies))
        batches = app.state.batcher.batches
        wrong = await call("POST", "/decode", [asgi_part(json.dumps({"z": odd[:, :3].tolist()}).encode(), more=False)])
        huge = np.zeros((1, 4, 33, 33), dtype=np.float32)  # 68x the training latent: over 64 (--max-batch 4 < 64)
        too_large = await call("POST", "/decode", [asgi_part(json.dumps({"z": huge.tolist()}).encode(), more=False)])
        return answers, wrong, too_large, batches

    # the 6x10 latents are 3.75x the training 4x4: one row per decoder call under --max-batch 4
    (a, b), wrong, too_large, batches = in_process_service(sampler, scenario, batching=Batching(4, 50.0))
    assert a[0] == b[0] == 200 and batches == 1 + 3
    np.testing.assert_allclose(np.load(io.BytesIO(a[2])), sampler.decode(small), rtol=1e-6)
    np.testing.assert_allclose(np.load(io.BytesIO(b[2])), expected, rtol=1e-4, atol=1e-5)
    assert wrong[0] == 400 and "(n, 4, h, w) with n, h, w >= 1" in json.loads(wrong[2])["error"]
    assert too_large[0] == 413 and "fastvae decode --tile" in json.loads(too_large[2])["error"]


def test_onnx_encoder_matches_torch(exported):
    import onnxruntime as ort

    model, _, encoder_report = exported
    assert encoder_report.latent_shape == (4, 4, 4) and max(encoder_report.parity.values()) < 1e-5
    session = ort.InferenceSession(str(encoder_report.path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).random((2, 3, 24, 40), dtype=np.float32)
    mu, logvar = session.run(["mu", "logvar"], {"image": x})
    with torch.inference_mode():
        mu_t, logvar_t = model.encode(torch.from_numpy(x))
    np.testing.assert_allclose(mu, mu_t.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(logvar, logvar_t.numpy(), rtol=1e-4, atol=1e-5)


def test_onnx_encoder_and_fastvae_encode_match_torch_and_round_trip_through_decode(exported, tmp_path, capsys):
    """The exported encoder had no torch-free entry but a raw onnxruntime session (an image of
    the wrong size: a broadcast error). OnnxEncoder and 'fastvae encode' (images, a folder, an
    array) give the torch encoder's mu and logvar; 'fastvae decode' takes the latents back."""
    from PIL import Image

    from fastvae.cli import main
    from fastvae.export import OnnxEncoder

    model, report, encoder_report = exported
    encoder = OnnxEncoder(encoder_report.path)
    pixels = np.random.default_rng(2).integers(0, 256, (2, 3, 24, 40), dtype=np.uint8)
    x = pixels.astype(np.float32) / 255
    with torch.inference_mode():
        mu_t, logvar_t = (t.numpy() for t in model.encode(torch.from_numpy(x)))
    mu, logvar = encoder.encode(pixels, batch_size=1)  # uint8 read as value / 255, in two calls
    np.testing.assert_allclose(mu, mu_t, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(logvar, logvar_t, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(encoder.encode(x[0])[0], encoder.encode(x[:1])[0])  # one (C, H, W) image
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(pixels):
        Image.fromarray(image.transpose(1, 2, 0)).save(folder / f"{i}.png")
    capsys.readouterr()
    assert main(["encode", str(encoder_report.path), str(folder), "--out", str(tmp_path / "z.npy"),
                 "--logvar-out", str(tmp_path / "lv.npy")]) == 0
    assert "wrote" in capsys.readouterr().out
    np.testing.assert_allclose(np.load(tmp_path / "z.npy"), mu_t, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.load(tmp_path / "lv.npy"), logvar_t, rtol=1e-4, atol=1e-5)
    np.save(tmp_path / "pixels.npy", pixels)
    assert main(["encode", str(encoder_report.path), str(tmp_path / "pixels.npy"), "--out", str(tmp_path / "z2.npy")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "z2.npy"), np.load(tmp_path / "z.npy"))
    assert main(["decode", str(report.path), str(tmp_path / "z.npy"), "--out", str(tmp_path / "back.npy")]) == 0
    torch_free = subprocess.run(  # as in a torch-free install: torch cannot be imported
        [sys.executable, "-c", "import sys; sys.modules['torch'] = None; from fastvae.cli import main; "
         "sys.exit(main(sys.argv[1:]))", "encode", str(encoder_report.path), str(folder), "--out", str(tmp_path / "z3.npy")],
        capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert torch_free.returncode == 0, torch_free.stderr[-2000:]
    np.testing.assert_array_equal(np.load(tmp_path / "z3.npy"), np.load(tmp_path / "z.npy"))
    with torch.inference_mode():
        expected = model.likelihood.mean(model.decode(torch.from_numpy(mu_t))).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "back.npy"), expected, rtol=1e-4, atol=1e-4)


def test_encode_refuses_what_the_encoder_cannot_take_in_one_line(exported, tmp_path):
    from PIL import Image

    from fastvae.export import OnnxEncoder

    _, report, encoder_report = exported
    with pytest.raises(FastVAEError, match=r"images of 18x40 pixels: .* multiples of 4 .* e.g. to 16x40"):
        OnnxEncoder(encoder_report.path).encode(np.zeros((1, 3, 18, 40), np.float32))
    with pytest.raises(FastVAEError, match=r"takes \(3, H, W\) images \(RGB\)"):
        OnnxEncoder(encoder_report.path).encode(np.zeros((1, 1, 16, 16), np.float32))
    with pytest.raises(FastVAEError, match=r"is a fastvae decoder: give its encoder"):
        OnnxEncoder(report.path)
    folder = tmp_path / "mixed"
    folder.mkdir()
    for name, size in (("a.png", (16, 16)), ("b.png", (24, 16))):
        Image.new("RGB", size).save(folder / name)
    (tmp_path / "notes.png").write_text("not an image")
    encoder = OnnxEncoder(encoder_report.path)
    with pytest.raises(FastVAEError, match=r"floats in \[0, 255\]: the encoder takes floats in \[0, 1\]"):
        encoder.encode(np.linspace(0, 255, 768, dtype=np.float32).reshape(1, 3, 16, 16))  # 0-255 floats: latents far off
    pixels = np.random.default_rng(3).integers(0, 256, (1, 3, 16, 16), dtype=np.uint8)
    np.testing.assert_array_equal(encoder.encode(pixels.tolist())[0], encoder.encode(pixels)[0])  # 0-255 ints
    from fastvae import config as config_module

    with pytest.MonkeyPatch.context() as patch:  # what the free memory cannot hold: one line, before the work
        patch.setattr(config_module, "available_memory", lambda: 2**20)
        with pytest.raises(FastVAEError, match=r"encoding 4 image\(s\) of 64x64 pixels, 4 per call, needs about"):
            encoder.encode(np.zeros((4, 3, 64, 64), np.uint8), batch_size=4)
    wide = tmp_path / "wide.png"  # 16-bit grayscale: Pillow's convert clipped it to near white
    gray = np.random.default_rng(4).integers(0, 256, (16, 16), dtype=np.uint16)
    Image.fromarray((gray * 257).astype(np.uint16)).save(wide)
    assert Image.open(wide).mode.startswith("I")
    (tmp_path / "lv_folder.npy").mkdir()
    rc, _, err = run_cli("encode", encoder_report.path, wide, "--out", tmp_path / "z.npy",
                         "--logvar-out", tmp_path / "lv_folder.npy")
    assert_one_line_error(rc, err, "lv_folder.npy is a folder")  # refused before mu is written
    assert not (tmp_path / "z.npy").exists()
    assert run_cli("encode", encoder_report.path, wide, "--out", tmp_path / "w.npy")[0] == 0
    np.testing.assert_array_equal(np.load(tmp_path / "w.npy"), encoder.encode(np.repeat(gray.astype(np.uint8)[None, None], 3, 1))[0])
    for args, needle in (([str(report.path), str(folder)], "is a fastvae decoder"),
                         ([str(encoder_report.path), str(folder)], "images of several sizes (a.png: 16x16, b.png: 16x24)"),
                         ([str(encoder_report.path), str(tmp_path / "notes.png")], "could not be read as an image"),
                         ([str(encoder_report.path), str(tmp_path / "none")], "does not exist")):
        rc, _, err = run_cli("encode", *args, "--out", tmp_path / "z.npy")
        assert_one_line_error(rc, err, needle)
    assert not (tmp_path / "z.npy").exists()


TILED_TOLERANCE = 2e-3  # max |tiled - untiled| with the blending alone at work (see the test)


def test_tiled_decoding_equals_untiled_within_tolerance(tmp_path):
    """Tiles blend into the untiled image. The decoder here is the untrained model's bicubic
    skip path (its GroupNorm paths output 0), so what differs is only what tiling itself
    changes: context at tile edges. GroupNorm's per-tile statistics add more for a trained
    decoder: benchmarks/test_bench_convkl.py measures that on a trained model."""
    import onnxruntime as ort

    from fastvae.export import export_decoder
    from fastvae.export.tiled_decode import decode_latents, tile_starts

    torch.manual_seed(0)
    model = build_model({**TINY, "data_shape": [3, 16, 16]}).eval()
    path = export_decoder(model, tmp_path / "decoder.onnx").path
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(z):
        return session.run(["mean"], {"z": z})[0]

    z = np.random.default_rng(2).standard_normal((2, 4, 40, 24), dtype=np.float32)
    whole = decode_latents(run, z, 4, 3)
    tiled = decode_latents(run, z, 4, 3, tile=16, overlap=8, batch_size=1)
    assert tiled.shape == whole.shape == (2, 3, 160, 96)
    err = float(np.abs(tiled - whole).max())
    assert err < TILED_TOLERANCE, err
    # without overlap the seams show: blending is what keeps the difference small
    seams = float(np.abs(decode_latents(run, z, 4, 3, tile=16, overlap=0) - whole).max())
    assert seams > 10 * err
    assert tile_starts(40, 16, 8) == [0, 8, 16, 24] and tile_starts(10, 16, 8) == [0]


def test_two_processes_equal_one_for_convkl(tmp_path):
    """2 DDP ranks with batch B/2 end where 1 process with batch B ends (the deterministic
    autoencoder of the same encoder/decoder: a VAE's per-rank noise differs by design)."""
    from fastvae.trainer import train

    splits = tiny_splits()
    base = dict(model="convkl", kind="ae", width=4, epochs=1, accelerator="cpu", progress=False,
                pictures=False, reparam="torch")
    train(TrainConfig(**base, batch_size=32, out=str(tmp_path / "one")), splits=splits)
    train(TrainConfig(**base, batch_size=16, devices=2, strategy="ddp_spawn", out=str(tmp_path / "two")),
          splits=splits)
    one, two = state_dict_of(tmp_path / "one"), state_dict_of(tmp_path / "two")
    worst = max(one, key=lambda k: float((one[k] - two[k]).abs().max()))
    assert max_weight_diff(one, two) < 1e-6, worst


def test_resume_equals_a_straight_run(tmp_path):
    from fastvae.trainer import train

    splits = tiny_splits()
    base = dict(model="convkl", width=4, batch_size=16, progress=False, pictures=False, reparam="torch")
    train(TrainConfig(**base, epochs=2, out=str(tmp_path / "straight")), splits=splits)
    train(TrainConfig(**base, epochs=1, out=str(tmp_path / "resumed")), splits=splits)
    train(TrainConfig(**base, epochs=2, out=str(tmp_path / "resumed")), resume=True, splits=splits)
    assert max_weight_diff(state_dict_of(tmp_path / "straight"), state_dict_of(tmp_path / "resumed")) == 0


def test_commands_end_to_end(tmp_path, capsys):
    """train (pictures), evaluate (bits per dim), report (PSNR beside bicubic), export with the
    encoder, decode: in process, on a tiny .npz of smooth images."""
    from fastvae.cli import main

    splits = tiny_splits(n_train=48, n_test=8)
    data = tmp_path / "images.npz"
    pixels = {name: (x.numpy() * 255).round().astype(np.uint8) for name, x in (("train", splits.train),
                                                                              ("test", splits.test))}
    np.savez(data, **pixels)  # 8-bit images, as photos are
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--model", "convkl", "--width", "4", "--downsample", "4",
                 "--channel-mult", "1,2,2", "--likelihood", "laplace", "--epochs", "1", "--batch-size", "16",
                 "--quiet", "--out", str(run)]) == 0
    # another --downsample no longer fits the run's --channel-mult: the error says what changed
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--downsample", "8", "--epochs", "2"]) == 2
    assert "setting(s) downsample (4, now 8) differ from the run" in capsys.readouterr().err
    for picture in ("reconstructions_side_by_side.png", "latent_channels.png", "samples.png", "interpolation.png"):
        assert (run / picture).is_file(), picture
    capsys.readouterr()
    assert main(["evaluate", str(run), "--iwae-k", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["pixel_levels"] == 256  # 8-bit images: a density's bins are 1/255 wide
    assert result["bits_per_dim"] == pytest.approx(result["iwae_nll"] / (3 * 16 * 16 * math.log(2)) + math.log2(255))
    assert main(["report", str(run), "--iwae-k", "3"]) == 0
    page = (run / "report.md").read_text()
    assert "reconstruction PSNR" in page and "bicubic baseline PSNR" in page and "latent 4x4x4" in page
    assert "| downsample | 4 |" in page and "| hidden_dim |" not in page and "Left out: latent_dim, hidden_dim" in page
    assert main(["export", str(run), "--encoder"]) == 0
    assert (run / "decoder.onnx").is_file() and (run / "encoder.onnx").is_file()
    checkpoint = (run / "checkpoints" / "last.ckpt").read_bytes()
    for flags, needle in ((["--encoder", "--encoder-out", str(run / "checkpoints" / "last.ckpt")], "must end in .onnx"),
                          (["--encoder", "--encoder-out", str(run / "decoder.onnx")], "where the decoder goes"),
                          (["--encoder-out", str(tmp_path / "e.onnx")], "goes with --encoder"),
                          (["--name", "x"], "goes with --triton-repo")):
        capsys.readouterr()
        assert main(["export", str(run), *flags]) == 2, flags
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == checkpoint
    # a decoder that fails after the encoder is exported leaves no encoder of another pair behind
    assert main(["export", str(run), "--encoder", "--int8", "--out", str(tmp_path / "pair" / "decoder.onnx")]) == 2
    assert not (tmp_path / "pair" / "encoder.onnx").exists()
    np.save(tmp_path / "z.npy", np.zeros((1, 4, 12, 8), dtype=np.float32))
    assert main(["decode", str(run / "decoder.onnx"), str(tmp_path / "z.npy"), "--out", str(tmp_path / "png"),
                 "--tile", "16", "--overlap", "4"]) == 0
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == ["0000.png"]
    from fastvae.export.tiled_decode import tile_starts

    tiles = len(tile_starts(12, 4, 1)) * len(tile_starts(8, 4, 1))  # 16 px = 4 positions, overlap 1
    assert tiles > 1 and f"decoded in {tiles} tiles of 16 px (overlap 4 px)" in capsys.readouterr().out
    assert main(["decode", str(run / "decoder.onnx"), str(tmp_path / "z.npy"), "--out", str(tmp_path / "one.npy"),
                 "--tile", "64"]) == 0  # 48 x 32 px: one tile
    assert "decoded whole (one --tile 64 covers it)" in capsys.readouterr().out
    # a tile under 4f (f = 4 here) still blends: at least one latent position of overlap (it was 0)
    assert main(["decode", str(run / "decoder.onnx"), str(tmp_path / "z.npy"), "--out", str(tmp_path / "t.npy"),
                 "--tile", "12"]) == 0
    assert "tiles of 12 px (overlap 4 px)" in capsys.readouterr().out


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    odd = tmp_path / "odd.npy"
    np.save(odd, np.random.default_rng(0).random((20, 3, 18, 18), dtype=np.float32))
    rc, _, err = run_cli("train", "--data", odd, "--model", "convkl", "--out", tmp_path / "run", "--quiet")
    assert_one_line_error(rc, err, "18x18", "--downsample 4")
    assert not (tmp_path / "run").exists()


def test_decode_refuses_what_the_free_memory_cannot_hold_and_tiles_fit(exported, tmp_path, capsys, monkeypatch):
    """fastvae decode ran a spatial decoder's session directly: a latent too large to decode
    whole was OOM-killed. Now its memory is checked first (latents, outputs and the working
    memory of one call), and tiles need only a tile's working memory."""
    from fastvae.cli import main
    from fastvae.export import sampler as sampler_module

    _, report, _ = exported
    z = tmp_path / "z.npy"
    np.save(z, np.zeros((2, 4, 64, 64), np.float32))  # 256x256 outputs: 16x the tile's working memory
    probe = sampler_module.OnnxSampler(report.path, threads=1)
    io_row, whole_work, _ = probe._bytes_per_row((4, 64, 64))
    tile_work = probe._bytes_per_row((4, 16, 16))[1]
    assert whole_work == 16 * tile_work
    monkeypatch.setattr(sampler_module, "CHECK_MEMORY_FROM", 0)
    # room for the outputs, one tile's working memory and one image's tile accumulators (2 copies),
    # not for one whole latent's working memory
    image = 4 * 3 * 256 * 256
    monkeypatch.setattr("fastvae.config.available_memory", lambda: 2 * io_row + tile_work + 2 * image)
    capsys.readouterr()
    assert main(["decode", str(report.path), str(z), "--out", str(tmp_path / "o.npy"), "--batch-size", "1"]) == 2
    err = capsys.readouterr().err
    assert "2 latents of shape (4, 64, 64) need about" in err and "tiles for large images ('fastvae decode --tile')" in err
    assert not (tmp_path / "o.npy").exists()
    assert main(["decode", str(report.path), str(z), "--out", str(tmp_path / "o.npy"), "--tile", "32",
                 "--overlap", "0", "--batch-size", "1"]) == 0  # 32 px (f = 4): 8x8 latents per call
    assert np.load(tmp_path / "o.npy").shape == (2, 3, 256, 256)
    capsys.readouterr()  # --check-untiled's whole decode does not fit: said before the tiled one
    assert main(["decode", str(report.path), str(z), "--out", str(tmp_path / "o2.npy"), "--tile", "32",
                 "--overlap", "0", "--batch-size", "1", "--check-untiled"]) == 2
    assert "--check-untiled decodes the latents whole too" in capsys.readouterr().err
    assert not (tmp_path / "o2.npy").exists()


def test_decode_refuses_latents_and_tiles_that_do_not_fit(exported, tmp_path):
    _, report, _ = exported
    z = tmp_path / "z.npy"
    for array, needle in ((np.zeros((1, 3, 8, 8), np.float32), "(n, 4, h, w)"),
                          (np.zeros((1, 4, 8, 8), np.int32), "dtype int32")):
        np.save(z, array)
        rc, _, err = run_cli("decode", report.path, z, "--out", tmp_path / "o.npy")
        assert_one_line_error(rc, err, needle)
    np.save(z, np.zeros((1, 4, 8, 8), np.float32))
    rc, _, err = run_cli("decode", report.path, z, "--out", tmp_path / "o.npy", "--tile", "30")
    assert_one_line_error(rc, err, "--tile 30 is not a multiple of 4")
    rc, _, err = run_cli("decode", report.path, z, "--out", tmp_path / "o.npy", "--tile", "16", "--overlap", "-4")
    assert_one_line_error(rc, err, "--overlap -4 is negative")
    import onnx

    damaged = onnx.load(report.path)
    for value in ("abc", "0", "3"):  # int('abc'), a division by zero, a broadcast error
        next(p for p in damaged.metadata_props if p.key == "downsample").value = value
        onnx.save(damaged, tmp_path / "d.onnx")
        rc, _, err = run_cli("decode", tmp_path / "d.onnx", z, "--out", tmp_path / "o.npy", "--tile", "16")
        assert_one_line_error(rc, err, f"downsample '{value}'", "export it again")
    big = np.zeros((1, 4, 8, 8))
    big[0, 0, 0, 0] = 1e39  # finite in float64, inf in float32
    np.save(z, big)
    rc, _, err = run_cli("decode", report.path, z, "--out", tmp_path / "o.npy")
    assert_one_line_error(rc, err, "beyond float32's range")
    np.savez(tmp_path / "two.npz", z=np.zeros((1, 4, 8, 8), np.float32), w=np.zeros(3))
    for given, needle in ((tmp_path / "two.npz", ".npz archive of 2 arrays"), (tmp_path, "is a folder")):
        rc, _, err = run_cli("decode", report.path, given, "--out", tmp_path / "o.npy")
        assert_one_line_error(rc, err, needle)
    # a wrong --out is refused before anything is read or decoded (the latents do not even exist)
    rc, _, err = run_cli("decode", report.path, tmp_path / "none.npy", "--out", tmp_path / "o.png")
    assert_one_line_error(rc, err, "--out", "o.png", ".npy file or a folder")
    assert not (tmp_path / "o.npy").exists()
    # an .npz of one array holds the latents
    latents = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    np.save(z, latents)
    np.savez(tmp_path / "one.npz", latents=latents)
    for given, out in ((z, "a.npy"), (tmp_path / "one.npz", "b.npy")):
        rc, _, err = run_cli("decode", report.path, given, "--out", tmp_path / out)
        assert rc == 0, err
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))
    rc, _, err = run_cli("decode", report.path, z, "--out", z)  # would replace the latents
    assert_one_line_error(rc, err, "is the latents file itself")
    np.testing.assert_array_equal(np.load(z), latents)
    rc, _, err = run_cli("decode", report.path, z, "--out", tmp_path / "C.NPY")  # numpy's own suffix rule
    assert rc == 0, err
    np.testing.assert_array_equal(np.load(tmp_path / "C.NPY"), np.load(tmp_path / "a.npy"))
    assert not list(tmp_path.glob(".*tmp*"))
    # a folder whose name has a dot: an existing one, or a new one named with a trailing slash
    (tmp_path / "imgs.v2").mkdir()
    for folder in (str(tmp_path / "imgs.v2"), str(tmp_path / "new.v3") + "/"):
        rc, _, err = run_cli("decode", report.path, z, "--out", folder)
        assert rc == 0, err
        assert sorted(p.name for p in Path(folder).iterdir()) == ["0000.png", "0001.png"]
    # PNGs of an earlier decode are never mixed with new ones: refused, or all replaced
    pngs = tmp_path / "pngs"
    assert run_cli("decode", report.path, z, "--out", pngs)[0] == 0
    first = (pngs / "0000.png").read_bytes()
    np.save(z, latents[1:])
    rc, _, err = run_cli("decode", report.path, z, "--out", pngs)
    assert_one_line_error(rc, err, "already holds 2 decoded image(s)", "--overwrite")
    rc, _, err = run_cli("decode", report.path, z, "--out", pngs, "--overwrite")
    assert rc == 0, err
    assert sorted(p.name for p in pngs.iterdir()) == ["0000.png"] and (pngs / "0000.png").read_bytes() != first


def test_photos_split_cuts_test_crops_from_other_photos():
    from fastvae.data import load_dataset
    from fastvae.photos import TEST_PHOTOS, TRAIN_PHOTOS, crop_size

    assert not set(TRAIN_PHOTOS) & set(TEST_PHOTOS)
    splits = load_dataset("photos")
    assert splits.train.shape[1:] == splits.test.shape[1:] == (3, 32, 32)
    assert 0.0 <= float(splits.train.min()) and float(splits.train.max()) <= 1.0
    assert torch.equal(load_dataset("photos").test, splits.test)  # reproducible
    assert crop_size("photos:64") == 64
    with pytest.raises(FastVAEError, match="photos:64"):
        crop_size("photos:48")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_convkl_trains_on_cuda_in_bf16_with_cuda_graphs_and_the_fused_kernel(tmp_path):
    """bf16, --compile-mode reduce-overhead, the fused kernel on the flattened latent,
    channels_last weights: finite losses that fall, and the kernel equals torch on CUDA."""
    from fastvae.kernels import philox_eps, reparameterize_kl
    from fastvae.reparam import reparameterize_kl_reference
    from fastvae.fabric_setup import make_fabric
    from fastvae.trainer import Trainer, train

    splits = tiny_splits(n_train=256, n_test=32, size=32)
    config = TrainConfig(model="convkl", width=16, batch_size=32, epochs=3, precision="bf16-mixed",
                         compile_mode="reduce-overhead", progress=False, pictures=False, out=str(tmp_path / "run"))
    result = train(config, splits=splits)
    losses = [row["train_loss"] for row in result.metrics]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    trainer = Trainer(make_fabric(config), config, splits)
    assert trainer.module.reparam_backend == "triton"
    assert trainer.module.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    mu = torch.randn(8, 4, 8, 8, device="cuda").contiguous(memory_format=torch.channels_last)
    flat = flatten_latent(mu)
    z, kl = reparameterize_kl(flat, flat * 0.1, seed=3)
    z_ref, kl_ref = reparameterize_kl_reference(flat, flat * 0.1, eps=philox_eps(3, *flat.shape, device="cuda"))
    torch.testing.assert_close(z, z_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kl, kl_ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("c", [1, 2])
def test_a_colour_image_in_fewer_latent_channels_starts_from_luma_and_chroma(c):
    """c < 3 latent channels for colour images: the image skip kept red alone (green and blue
    started flat grey: ~12 dB on the photos where the bicubic codec gives ~26); now it keeps
    luma (c = 1) or luma and the blue difference (c = 2), Pillow's YCbCr of the same pixels, and
    the decoder maps them back to colour."""
    from PIL import Image

    from fastvae.models.convkl import SKIP_GAIN

    model = tiny_model(shape=(3, 8, 8), latent_channels=c).eval()
    rgb = np.random.default_rng(c).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        latent = model.encoder.skip(x)  # the 1x1 map alone: per pixel
        back = model.decoder.skip(latent)
    ycbcr = np.asarray(Image.fromarray(rgb).convert("YCbCr"), dtype=np.float64) / 255  # Cb, Cr offset 128/255
    expect = [ycbcr[..., 0] - 0.5, ycbcr[..., 1] - 128 / 255][:c]
    for k in range(c):
        np.testing.assert_allclose(latent[0, k].numpy() / SKIP_GAIN, expect[k], atol=1 / 255)
    luma = ycbcr[..., 0]
    if c == 1:  # grey of the image's luma in every channel
        for channel in range(3):
            np.testing.assert_allclose(back[0, channel].numpy(), luma, atol=1 / 255)
    else:  # blue is luma + 1.772 Cb exactly (no red difference kept)
        np.testing.assert_allclose(back[0, 2].numpy(), luma + 1.772 * (ycbcr[..., 1] - 128 / 255), atol=4 / 255)
