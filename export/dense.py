"""Convolutions on small, fixed-size inputs lowered to one dense matrix product for export.

A convolution (or transposed convolution) is linear in its input, so on an input of fixed shape
(C, H, W) it *is* a matrix: y.flatten() = x.flatten() @ M + b, with row i of M the layer's
bias-free response to the i-th unit vector. The decoder's spatial shapes are fixed (only the
batch varies), and its first deconvolutions run on tiny grids (2x2, 4x4 for the 8x8 digits),
where onnxruntime spends most of the time outside the arithmetic: layout reorders and
DepthToSpace copies. There one Gemm does the same products faster: the digits conv decoder ran
2.4x faster in onnxruntime (10.5 ms -> 4.4 ms per 1,000 samples, 2-core AMD EPYC).

M has n_in x n_out entries where the convolution does fewer multiply-adds, so a layer is lowered
only while the dense product costs at most ``MAX_COST_RATIO`` times the convolution's
multiply-adds and M stays under ``MAX_ENTRIES``; larger layers (a 28x28 decoder's) keep their
convolutions. The entries of M are the layer's weights (or zeros), so the map is exact; only the
order of the float sums changes. The file grows by the zeros of M (the digits conv decoder's
0.13 MB of deconvolution weights become 0.66 MB of matrices).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
MAX_COST_RATIO = 4  # dense multiply-adds / convolution multiply-adds
# 1 Mi entries (4 MiB of fp32). Measured with onnxruntime on the 2-core dev CPU, 1,000 samples:
# the 8x8 decoder's layers (131 Ki entries at ratio 1, 32 Ki at ratio 4) ran 2.4x faster as
# Gemms; the 16x16 decoder's first layer (2 Mi entries, ratio 4) ran 7% slower, so it stays.
MAX_ENTRIES = 1 << 20
_CHUNK_ELEMENTS = 1 << 22  # unit vectors pushed through the layer at a time: 32 MiB of fp64


class DenseLinearMap(nn.Module):
    """``conv`` on inputs shaped ``in_shape`` (no batch dim) as Flatten -> Linear -> Unflatten."""

    def __init__(self, conv: nn.Module, in_shape: tuple[int, ...]):
        super().__init__()
        if not isinstance(conv, CONV_TYPES):
            raise TypeError(f"only convolutions are lowered, got {type(conv).__name__}")
        self.in_shape = tuple(in_shape)
        matrix, self.out_shape = dense_matrix(conv, self.in_shape)
        self.linear = nn.Linear(matrix.shape[0], matrix.shape[1], bias=True)
        with torch.no_grad():
            self.linear.weight.copy_(matrix.T)
            bias = torch.zeros(self.out_shape, dtype=torch.float64)
            if conv.bias is not None:  # one bias per output channel, the same at every position
                spatial = (1,) * (len(self.out_shape) - 1)
                bias += conv.bias.detach().to(torch.float64).reshape(-1, *spatial)
            self.linear.bias.copy_(bias.reshape(-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1)).unflatten(1, self.out_shape)


def dense_matrix(conv: nn.Module, in_shape: tuple[int, ...]) -> tuple[torch.Tensor, tuple[int, ...]]:
    """(M, out_shape): M[i] = conv without bias applied to unit vector i, in float64."""
    layer = _bias_free_fp64_copy(conv)
    n_in = math.prod(in_shape)
    chunk = max(1, _CHUNK_ELEMENTS // n_in)
    rows = []
    with torch.no_grad():
        for start in range(0, n_in, chunk):
            stop = min(start + chunk, n_in)
            basis = torch.zeros(stop - start, n_in, dtype=torch.float64)
            basis[:, start:stop].fill_diagonal_(1.0)
            out = layer(basis.reshape(-1, *in_shape))
            rows.append(out.flatten(1))
    return torch.cat(rows), tuple(out.shape[1:])


def worth_lowering(conv: nn.Module, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> bool:
    """True when M is small and costs at most MAX_COST_RATIO x the convolution's multiply-adds."""
    n_in, n_out = math.prod(in_shape), math.prod(out_shape)
    taps = math.prod(conv.kernel_size)
    if conv.transposed:  # every input element meets C_out/groups x taps weights
        conv_macs = n_in * conv.out_channels // conv.groups * taps
    else:  # every output element sums C_in/groups x taps products
        conv_macs = n_out * conv.in_channels // conv.groups * taps
    return n_in * n_out <= MAX_ENTRIES and n_in * n_out <= MAX_COST_RATIO * conv_macs


def lower_small_convolutions(decoder: nn.Module, example_input: torch.Tensor) -> int:
    """Replace, in place, each convolution below ``decoder`` that :func:`worth_lowering` on the
    shape it sees when ``decoder(example_input)`` runs; return how many were replaced."""
    shapes: dict[nn.Module, set] = {}

    def record(module, inputs, output):
        shapes.setdefault(module, set()).add((tuple(inputs[0].shape[1:]), tuple(output.shape[1:])))

    hooks = [m.register_forward_hook(record) for m in decoder.modules() if isinstance(m, CONV_TYPES)]
    try:
        with torch.no_grad():
            decoder(example_input)
    finally:
        for hook in hooks:
            hook.remove()

    count = 0
    for parent in list(decoder.modules()):
        for name, child in parent.named_children():
            seen = shapes.get(child, set())
            if len(seen) != 1:  # unused, or called on several shapes: keep the convolution
                continue
            (in_shape, out_shape), = seen
            if worth_lowering(child, in_shape, out_shape):
                setattr(parent, name, DenseLinearMap(child, in_shape).to(child.weight.dtype))
                count += 1
    return count


def _bias_free_fp64_copy(conv: nn.Module) -> nn.Module:
    layer = copy.deepcopy(conv).to(torch.float64)
    layer.bias = None
    return layer
