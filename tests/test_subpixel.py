"""Transposed convolutions rewritten as Conv + PixelShuffle for export: the same function."""

import copy

import onnx
import pytest
import torch
from torch import nn

from fastvae.export import export_decoder
from fastvae.export.subpixel import SubPixelConvTranspose2d, can_rewrite, rewrite_transposed_convs
from fastvae.models import build_model


@pytest.mark.parametrize("c_in,c_out,h,w,bias", [(3, 5, 4, 4, True), (64, 32, 2, 2, True),
                                                 (8, 1, 7, 5, False), (1, 1, 1, 1, True)])
def test_subpixel_equals_conv_transpose(c_in, c_out, h, w, bias):
    torch.manual_seed(c_in + c_out + h)
    deconv = nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1, bias=bias).double()
    x = torch.randn(6, c_in, h, w, dtype=torch.float64)
    ours = SubPixelConvTranspose2d(deconv).double()
    torch.testing.assert_close(ours(x), deconv(x), rtol=1e-12, atol=1e-12)


def test_only_kernel4_stride2_padding1_is_rewritten():
    assert can_rewrite(nn.ConvTranspose2d(2, 2, 4, stride=2, padding=1))
    for other in (nn.ConvTranspose2d(2, 2, 3, stride=2, padding=1),
                  nn.ConvTranspose2d(2, 2, 4, stride=2, padding=1, output_padding=1),
                  nn.ConvTranspose2d(2, 2, 4, stride=1, padding=1), nn.Conv2d(2, 2, 4)):
        assert not can_rewrite(other)
    with pytest.raises(ValueError):
        SubPixelConvTranspose2d(nn.ConvTranspose2d(2, 2, 3))


@pytest.mark.parametrize("shape", [[1, 8, 8], [1, 28, 28], [3, 7, 9]])
def test_conv_decoder_rewrite_keeps_outputs(shape):
    torch.manual_seed(0)
    decoder = build_model({"model": "conv", "data_shape": shape, "hidden_dim": 32}).decoder.eval()
    rewritten = copy.deepcopy(decoder)
    assert rewrite_transposed_convs(rewritten) == 2
    z = torch.randn(9, 8)
    with torch.no_grad():
        torch.testing.assert_close(rewritten(z), decoder(z), rtol=1e-5, atol=1e-5)


def test_exported_conv_decoder_has_no_conv_transpose(tmp_path):
    torch.manual_seed(0)
    # 28x28: too large to become dense matrices (test_dense.py), so the subpixel form is exported
    model = build_model({"model": "conv", "data_shape": [1, 28, 28], "hidden_dim": 32})
    report = export_decoder(model, tmp_path / "d.onnx", exporter="torchscript")
    ops = {node.op_type for node in onnx.load(report.path).graph.node}
    assert "ConvTranspose" not in ops and "DepthToSpace" in ops
    assert report.rewrites == "2 transposed convolution(s) as Conv + DepthToSpace"
    assert max(report.parity.values()) < 1e-4  # against the untouched torch decoder
