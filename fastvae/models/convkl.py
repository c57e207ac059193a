"""Spatial-latent convolutional VAE (``--model convkl``): the latent-diffusion KL autoencoder.

An image (C, H, W) maps to a latent (c, H/f, W/f), f = ``--downsample`` in {2, 4, 8},
c = ``--latent-channels``. Encoder: conv_in, per resolution level ``blocks_per_level`` ResNet
blocks (GroupNorm, SiLU, 3x3 conv, twice, plus the shortcut) then a stride-2 conv, a mid block
(ResNet, optional self-attention, ResNet) at the lowest resolution, GroupNorm, SiLU, a 3x3 conv to
2c channels: mu and logvar, logvar clamped to [-30, 20] before anything exponentiates it (so
bf16/fp16 runs cannot turn a large logvar into inf). The decoder mirrors it (nearest upsampling
+ conv; one more block per level) and ends in C channels: the likelihood's parameters.

``image_skip`` (default on) is the design choice that makes this model good on a small budget:
the latent starts as the image, area-downsampled by f and scaled ((x - 0.5) * 4 into the first
min(c, C) channels, a learned 1x1 conv), and the decoder output starts as the bicubic upsampling
of the latent mapped back to pixels (a learned 1x1 conv), the ResNet paths adding residuals
from zero-initialised output convolutions. So the untrained model is the bicubic down-then-up
codec, and training refines it; the plain design starts from noise and trails bicubic for
minutes of CPU time. Both paths are ordinary layers of the model (exported, trained, counted).

The model is fully convolutional: the decoder takes any latent height and width (the ONNX
export keeps them symbolic); the encoder needs H and W divisible by f (``check_image_size``).
``latent_shape`` is (c, H/f, W/f) for the training images; the VAE flattens mu and logvar
(in memory order: channels_last stays a view) before ``reparameterize_kl``, so the KL is over
all c*h*w latent dims and goes through the fused kernel on CUDA.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fastvae.config import parse_channel_mult
from fastvae.errors import FastVAEError

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # as the latent-diffusion reference clamps it
SKIP_GAIN = 4.0  # image skip: latent = (pixel - 0.5) * SKIP_GAIN, about unit variance
SKIP_LOGVAR = -6.0  # image skip: posterior std starts at exp(-3), small beside the image values


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups (as the reference) of at least 2 channels: with one
    channel per group it would be instance norm, which erases each channel's mean (and makes
    the bias of the conv before it a parameter without gradient)."""
    return nn.GroupNorm(math.gcd(32, max(1, channels // 2)), channels, eps=1e-6)


class ResBlock(nn.Module):
    """x + conv(SiLU(GN(conv(SiLU(GN(x)))))), with a 1x1 conv shortcut when channels change."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1, self.conv1 = group_norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = group_norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.shortcut(x) + h


class SelfAttention(nn.Module):
    """Single-head self-attention over the positions of a feature map (the mid block's).

    Written as matmul + softmax (not a fused attention op) so the ONNX graph has a plain
    Softmax node, which the fp16 export keeps in fp32.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).flatten(2).chunk(3, dim=1)  # (b, c, hw) each
        weights = torch.softmax(q.transpose(1, 2) @ k * (c ** -0.5), dim=-1)  # (b, hw, hw)
        out = (v @ weights.transpose(1, 2)).view(b, c, h, w)
        return x + self.proj(out)


def mid_block(channels: int, attention: bool) -> nn.Sequential:
    layers = [ResBlock(channels, channels)]
    if attention:
        layers.append(SelfAttention(channels))
    layers.append(ResBlock(channels, channels))
    return nn.Sequential(*layers)


class Settings:
    """The convkl settings of a model spec, checked (``fastvae.config.CONVKL_SETTINGS``)."""

    def __init__(self, spec: dict):
        shape = tuple(int(s) for s in spec["data_shape"])
        if len(shape) != 3:
            raise FastVAEError(f"--model convkl needs images (C, H, W), got data of shape {shape}")
        self.data_shape = shape
        self.f = int(spec["downsample"])
        if self.f not in (2, 4, 8):
            raise FastVAEError(f"--downsample must be 2, 4 or 8, got {self.f}")
        self.latent_channels = int(spec["latent_channels"])
        self.widths = [int(spec["width"]) * m for m in parse_channel_mult(spec["channel_mult"], self.f)]
        self.blocks = int(spec["blocks_per_level"])
        self.attention = bool(spec["attention"])
        self.image_skip = bool(spec["image_skip"])
        self.likelihood = "none" if spec.get("kind") == "ae" else str(spec["likelihood"])


def check_image_size(spec: dict) -> None:
    """FastVAEError unless the images' H and W are multiples of the downsampling factor f."""
    _, h, w = Settings(spec).data_shape
    f = int(spec["downsample"])
    if h < f or w < f:  # rows of numbers (1 x D), or images smaller than one latent position
        raise FastVAEError(
            f"--model convkl needs images of at least {f}x{f} pixels (--downsample {f}), got data of shape "
            f"{tuple(Settings(spec).data_shape)}: for rows of numbers use --model mlp")
    if h % f or w % f:
        raise FastVAEError(
            f"images of {h}x{w} pixels do not divide by --downsample {f}: crop or resize them "
            f"to multiples of {f} (e.g. {h - h % f}x{w - w % f}), or pick another --downsample"
        )


class ConvKLEncoder(nn.Module):
    """q(z|x): image (B, C, H, W) -> (mu, logvar), each (B, c, H/f, W/f)."""

    def __init__(self, spec: dict):
        super().__init__()
        check_image_size(spec)
        s = Settings(spec)
        c_img, h, w = s.data_shape
        self.f, self.image_skip = s.f, s.image_skip
        self.latent_shape = (s.latent_channels, h // s.f, w // s.f)
        self.conv_in = nn.Conv2d(c_img, s.widths[0], 3, padding=1)
        layers, prev = [], s.widths[0]
        for level, width in enumerate(s.widths):
            for _ in range(s.blocks):
                layers.append(ResBlock(prev, width))
                prev = width
            if level < len(s.widths) - 1:
                layers.append(nn.Conv2d(width, width, 3, stride=2, padding=1))
        self.down = nn.Sequential(*layers)
        self.mid = mid_block(prev, s.attention)
        self.norm_out = group_norm(prev)
        self.conv_out = nn.Conv2d(prev, 2 * s.latent_channels, 3, padding=1)
        if s.image_skip:
            self.skip = nn.Conv2d(c_img, s.latent_channels, 1)
            _image_to_latent_init(self.skip)
            nn.init.zeros_(self.conv_out.weight)
            with torch.no_grad():  # mu starts as the skip alone, logvar at SKIP_LOGVAR
                self.conv_out.bias.zero_()
                self.conv_out.bias[s.latent_channels:] = SKIP_LOGVAR

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.mid(self.down(self.conv_in(x)))
        mu, logvar = self.conv_out(F.silu(self.norm_out(h))).chunk(2, dim=1)
        if self.image_skip:
            mu = mu + self.skip(F.avg_pool2d(x, self.f))
        return mu, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)


class ConvKLDecoder(nn.Module):
    """p(x|z): latent (B, c, h, w), any h and w -> parameters (B, C, h*f, w*f)."""

    def __init__(self, spec: dict):
        super().__init__()
        s = Settings(spec)
        c_img = s.data_shape[0]
        self.f, self.image_skip, self.likelihood = s.f, s.image_skip, s.likelihood
        self.conv_in = nn.Conv2d(s.latent_channels, s.widths[-1], 3, padding=1)
        self.mid = mid_block(s.widths[-1], s.attention)
        layers, prev = [], s.widths[-1]
        for level in reversed(range(len(s.widths))):
            for _ in range(s.blocks + 1):
                layers.append(ResBlock(prev, s.widths[level]))
                prev = s.widths[level]
            if level > 0:
                layers += [nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(prev, prev, 3, padding=1)]
        self.up = nn.Sequential(*layers)
        self.norm_out = group_norm(prev)
        self.conv_out = nn.Conv2d(prev, c_img, 3, padding=1)
        if s.image_skip:
            self.skip = nn.Conv2d(s.latent_channels, c_img, 1)
            _latent_to_image_init(self.skip)
            nn.init.zeros_(self.conv_out.weight)
            nn.init.zeros_(self.conv_out.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.up(self.mid(self.conv_in(z)))
        out = self.conv_out(F.silu(self.norm_out(h)))
        if self.image_skip:
            out = out + self.base(z)
        return out

    def base(self, z: torch.Tensor) -> torch.Tensor:
        """The skip path: the latent's low-resolution image, bicubic-upsampled by f (for a
        Bernoulli likelihood as logits)."""
        image = F.interpolate(self.skip(z), scale_factor=float(self.f), mode="bicubic", align_corners=False)
        if self.likelihood in ("bernoulli", "none"):  # parameters are logits
            image = torch.logit(image.clamp(1e-3, 1.0 - 1e-3))
        return image


# JPEG's YCbCr (BT.601, full range): luma, then the blue and red differences; where a colour
# image has more channels than the latent (c < 3), the skip keeps the first c of these
TO_LUMA_CHROMA = ((0.299, 0.587, 0.114), (-0.168736, -0.331264, 0.5), (0.5, -0.418688, -0.081312))
FROM_LUMA_CHROMA = ((1.0, 0.0, 1.402), (1.0, -0.344136, -0.714136), (1.0, 1.772, 0.0))


def _image_to_latent_init(conv: nn.Conv2d) -> None:
    """latent channel k = (pixel channel k - 0.5) * SKIP_GAIN for k < min(c, C), others 0; a
    colour image in fewer latent channels (c < 3): luma (- 0.5) then chroma, times SKIP_GAIN
    (channel k alone kept only red: green and blue started flat grey, ~12 dB at c = 1)."""
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
        if conv.in_channels == 3 and conv.out_channels < 3:
            for k in range(conv.out_channels):
                conv.weight[k, :, 0, 0] = SKIP_GAIN * torch.tensor(TO_LUMA_CHROMA[k])
            conv.bias[0] = -0.5 * SKIP_GAIN
            return
        for k in range(min(conv.in_channels, conv.out_channels)):
            conv.weight[k, k] = SKIP_GAIN
            conv.bias[k] = -0.5 * SKIP_GAIN


def _latent_to_image_init(conv: nn.Conv2d) -> None:
    """The inverse map: pixel channel k = latent channel k / SKIP_GAIN + 0.5 (grey elsewhere);
    from luma and chroma, the colour they give (the chroma left out taken as 0)."""
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.fill_(0.5)
        if conv.out_channels == 3 and conv.in_channels < 3:
            for k in range(conv.in_channels):
                conv.weight[:, k, 0, 0] = torch.tensor([row[k] for row in FROM_LUMA_CHROMA]) / SKIP_GAIN
            return
        for k in range(min(conv.in_channels, conv.out_channels)):
            conv.weight[k, k] = 1.0 / SKIP_GAIN


def _dense_channels_last(t: torch.Tensor) -> bool:
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def latent_channels_last(*latents: torch.Tensor) -> bool:
    """Whether to flatten ``latents`` (mu, logvar) in channels_last order: where any of them is
    laid out so (a channels_last model's). One order for all, so that flat mu, logvar and z
    pair up element by element: a channels_last model's mu without the image skip is a chunk of
    the last conv's output (dense in neither layout), its clamped logvar a dense channels_last
    tensor, and each flattened in its own order paired mu at one position with logvar at another."""
    return any(_dense_channels_last(t) for t in latents)


def flatten_latent(t: torch.Tensor, channels_last: bool | None = None) -> torch.Tensor:
    """(B, c, h, w) -> (B, c*h*w) in (B, c, h, w) or, with ``channels_last``, (B, h, w, c) order:
    a view where ``t`` is laid out so (``None``: ``t``'s own layout). (B, D) is kept."""
    if t.dim() != 4:
        return t.reshape(len(t), -1)
    if _dense_channels_last(t) if channels_last is None else channels_last:
        return t.permute(0, 2, 3, 1).reshape(len(t), -1)
    return t.reshape(len(t), -1)


def unflatten_latent(flat: torch.Tensor, like: torch.Tensor, channels_last: bool | None = None) -> torch.Tensor:
    """The inverse of ``flatten_latent(like, channels_last)``: ``flat`` shaped like ``like``."""
    if like.dim() == 4 and (_dense_channels_last(like) if channels_last is None else channels_last):
        b, c, h, w = like.shape
        return flat.view(b, h, w, c).permute(0, 3, 1, 2)
    return flat.view(like.shape)
