"""Small convolutions lowered to one dense matrix product for export: the same function."""

import copy

import onnx
import pytest
import torch
from torch import nn

from fastvae.export import export_decoder
from fastvae.export.dense import DenseLinearMap, dense_matrix, lower_small_convolutions, worth_lowering
from fastvae.models import build_model

LAYERS = {
    "conv2d": (lambda: nn.Conv2d(3, 4, 3, padding=1), (3, 5, 6)),
    "conv2d-stride-dilation-nobias": (lambda: nn.Conv2d(4, 6, 3, stride=2, dilation=2, bias=False), (4, 9, 8)),
    "conv2d-groups-circular": (lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2, padding_mode="circular"), (4, 5, 5)),
    "deconv-k4s2p1": (lambda: nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1), (64, 2, 2)),
    "deconv-output-padding-groups": (lambda: nn.ConvTranspose2d(4, 2, 3, stride=2, output_padding=1, groups=2), (4, 3, 2)),
    "conv1d": (lambda: nn.Conv1d(2, 3, 5, padding=2), (2, 11)),
    "deconv3d": (lambda: nn.ConvTranspose3d(2, 1, 2, stride=2), (2, 2, 3, 2)),
    "conv2d-1600-inputs": (lambda: nn.Conv2d(4, 2, 3), (4, 20, 20)),
}


@pytest.mark.parametrize("name", LAYERS)
def test_dense_map_equals_the_convolution(name):
    make, in_shape = LAYERS[name]
    torch.manual_seed(len(name))
    conv = make().double()
    x = torch.randn(5, *in_shape, dtype=torch.float64)
    dense = DenseLinearMap(conv, in_shape).double()
    torch.testing.assert_close(dense(x), conv(x), rtol=1e-12, atol=1e-12)


def test_matrix_built_in_chunks_equals_one_piece(monkeypatch):
    import fastvae.export.dense as dense

    conv = nn.ConvTranspose2d(4, 3, 3, stride=2).double()
    whole, shape = dense_matrix(conv, (4, 5, 5))
    monkeypatch.setattr(dense, "_CHUNK_ELEMENTS", 7 * 100)  # 7 unit vectors per chunk, 15 chunks
    pieces, same_shape = dense_matrix(conv, (4, 5, 5))
    assert same_shape == shape and torch.equal(pieces, whole)


@pytest.mark.parametrize("name", LAYERS)
def test_cost_rule_counts_at_least_every_nonzero_weight_use(name):
    """Each nonzero entry of M is one multiply-add the convolution does, so the convolution's
    multiply-add count used by the cost rule can never be below M's nonzero count."""
    make, in_shape = LAYERS[name]
    conv = make().double()
    matrix, out_shape = dense_matrix(conv, in_shape)
    nonzero = int((matrix != 0).sum())
    taps = int(torch.tensor(conv.kernel_size).prod())
    n_in, n_out = matrix.shape
    conv_macs = (n_in * conv.out_channels if conv.transposed else n_out * conv.in_channels) // conv.groups * taps
    assert nonzero <= conv_macs
    # and the rule follows from the counts: lowered iff small and at most 4x the work
    expected = n_in * n_out <= (1 << 20) and n_in * n_out <= 4 * conv_macs
    assert worth_lowering(conv, in_shape, out_shape) == expected


@pytest.mark.parametrize("shape,lowered", [([1, 8, 8], 2), ([3, 7, 9], 1), ([1, 16, 16], 0), ([1, 28, 28], 0)])
def test_conv_decoder_lowering_keeps_outputs(shape, lowered):
    torch.manual_seed(0)
    decoder = build_model({"model": "conv", "data_shape": shape, "hidden_dim": 32}).decoder.eval()
    rewritten = copy.deepcopy(decoder)
    assert lower_small_convolutions(rewritten, torch.zeros(1, 8)) == lowered
    assert sum(isinstance(m, DenseLinearMap) for m in rewritten.modules()) == lowered
    z = torch.randn(9, 8)
    with torch.no_grad():
        torch.testing.assert_close(rewritten(z), decoder(z), rtol=1e-5, atol=1e-5)


def test_a_convolution_used_on_two_shapes_is_kept():
    conv = nn.Conv2d(1, 1, 3, padding=1)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = conv

        def forward(self, z):
            a = self.conv(z.reshape(-1, 1, 2, 4))
            return a.flatten(1), self.conv(z.reshape(-1, 1, 4, 2)).flatten(1)

    module = Twice()
    assert lower_small_convolutions(module, torch.zeros(1, 8)) == 0 and module.conv is conv


def test_only_convolutions_are_lowered():
    with pytest.raises(TypeError, match="only convolutions"):
        DenseLinearMap(nn.Linear(2, 2), (2,))


def test_exported_digits_conv_decoder_is_all_gemm(tmp_path):
    torch.manual_seed(0)
    model = build_model({"model": "conv", "data_shape": [1, 8, 8], "hidden_dim": 32})
    report = export_decoder(model, tmp_path / "d.onnx", exporter="torchscript")
    ops = [node.op_type for node in onnx.load(report.path).graph.node]
    assert ops.count("Gemm") == 4 and not {"Conv", "ConvTranspose", "DepthToSpace"} & set(ops)
    assert max(report.parity.values()) < 1e-4  # against the untouched torch decoder
    assert report.rewrites == "2 convolution(s) as one dense Gemm each"
    assert f"graph: {report.rewrites}" in report.summary()


def test_mlp_decoder_is_exported_as_it_is(tmp_path):
    torch.manual_seed(0)
    model = build_model({"model": "mlp", "data_shape": [1, 8, 8], "hidden_dim": 32})
    report = export_decoder(model, tmp_path / "d.onnx")
    assert report.rewrites == "" and "graph:" not in report.summary()
