"""Models: MLP and conv encoders/decoders, the ``VAE`` module, the stacked-autoencoder baseline.

``build_model(spec)`` turns a plain dict (stored in every checkpoint) into a module: the
``data_shape`` [C, H, W] plus the settings ``fastvae.config.MODEL_SETTINGS`` names, e.g.
``{"model": "mlp", "kind": "vae", "data_shape": [1, 8, 8], "latent_dim": 8, "hidden_dim": 512,
"likelihood": "bernoulli", "sigma": 0.1, "learn_sigma": False}`` (missing settings take
``TrainConfig``'s defaults). Every model says what it is in ``model.kind``: ``"vae"`` (a
likelihood, an ELBO) or ``"ae"`` (the deterministic MSE autoencoder).
"""

from __future__ import annotations

from torch import nn

from fastvae.config import MODEL_SETTINGS, TrainConfig
from fastvae.float32_default import float32_by_default
from fastvae.models.conv import ConvDecoder, ConvEncoder
from fastvae.models.convkl import ConvKLDecoder, ConvKLEncoder
from fastvae.models.mlp import MLPDecoder, MLPEncoder
from fastvae.models.vae import VAE, StackedAutoencoder, VAEOutput

# keyed by fastvae.config.MODELS (a test checks that the two agree)
ARCHITECTURES = {"mlp": (MLPEncoder, MLPDecoder), "conv": (ConvEncoder, ConvDecoder),
                 "convkl": (ConvKLEncoder, ConvKLDecoder)}
SPEC_ARCHITECTURES = ("convkl",)  # built from the whole spec, not (shape, hidden_dim, latent_dim)
DEFAULT_SPEC = {name: getattr(TrainConfig, name) for name in MODEL_SETTINGS}


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module inside Lightning Fabric, DDP/DataParallel and torch.compile wrappers."""
    parallel = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    for _ in range(8):  # wrappers nest a few levels at most
        inner = next((getattr(module, a) for a in ("_forward_module", "_orig_mod")
                      if isinstance(getattr(module, a, None), nn.Module)), None)
        if inner is None and isinstance(module, parallel):
            inner = module.module
        if inner is None:
            return module
        module = inner
    return module


def check_model(spec: dict) -> None:
    """FastVAEError when ``spec`` builds no model (data the model cannot take, e.g. a convkl
    image size f does not divide; sizes torch refuses) or one whose fp32 weights alone exceed
    this machine's memory; built on the meta device (no memory, a few ms), before training
    starts (one line, not a failure in every process) and before a train --overwrite removes
    the old run."""
    import torch

    from fastvae.config import host_memory
    from fastvae.errors import FastVAEError, one_line

    try:
        with torch.device("meta"):
            model = build_from_spec(spec)
    except (ValueError, TypeError, OverflowError, RuntimeError) as exc:
        raise FastVAEError(f"these settings build no model: {one_line(exc)}") from None
    count = sum(p.numel() for p in model.parameters())
    memory = host_memory()
    if memory and 4 * count > memory:
        raise FastVAEError(f"the model would have {count:,} parameters ({4 * count / 2**30:.3g} GiB in fp32), "
                           f"more than the memory here ({memory / 2**30:.3g} GiB: the machine's, or its container's limit): use a smaller "
                           "--hidden-dim or --latent-dim (convkl: --width, --channel-mult, --blocks-per-level)")


def build_model(spec: dict) -> VAE | StackedAutoencoder:
    """Build a fresh model from a spec dict: ``data_shape`` and any of ``DEFAULT_SPEC``'s keys
    (missing ones take its values). A spec naming no data shape, an unknown key (a typo was
    ignored: ``latnet_dim``), an unknown kind, or sizes that build no model: FastVAEError."""
    from fastvae.config import KINDS, closest_setting
    from fastvae.errors import FastVAEError, one_line

    if not isinstance(spec, dict) or "data_shape" not in spec:
        raise FastVAEError("build_model takes a dict with data_shape (C, H, W) and any of " + ", ".join(DEFAULT_SPEC)
                           + f", got {spec!r:.80}")
    unknown = sorted(set(spec) - set(DEFAULT_SPEC) - {"data_shape"})
    if unknown:
        meant = [closest_setting(k, DEFAULT_SPEC) for k in unknown]
        raise FastVAEError("build_model: unknown key(s) "
                           + ", ".join(k + (f" (did you mean {m}?)" if m else "") for k, m in zip(unknown, meant))
                           + "; known keys are data_shape, " + ", ".join(DEFAULT_SPEC))
    if spec.get("kind", DEFAULT_SPEC["kind"]) not in KINDS:
        raise FastVAEError(f"build_model: kind must be one of {', '.join(KINDS)}, got {spec['kind']!r}")
    try:
        return build_from_spec(spec)
    except (ValueError, TypeError, OverflowError, RuntimeError) as exc:
        raise FastVAEError(f"build_model: this spec builds no model: {one_line(exc)}") from None


@float32_by_default
def build_from_spec(spec: dict) -> VAE | StackedAutoencoder:
    """``build_model`` without its checks: a checkpoint's spec (``fastvae.load`` says what is
    wrong with a damaged one)."""
    from fastvae.losses import Likelihood

    spec = {**DEFAULT_SPEC, **spec}
    if spec["model"] not in ARCHITECTURES:
        raise ValueError(f"unknown model {spec['model']!r}: use one of {sorted(ARCHITECTURES)}")
    encoder_cls, decoder_cls = ARCHITECTURES[spec["model"]]
    shape = tuple(int(s) for s in spec["data_shape"])
    spec["data_shape"] = list(shape)
    if spec["model"] in SPEC_ARCHITECTURES:
        encoder, decoder = encoder_cls(spec), decoder_cls(spec)
    else:
        args = (shape, int(spec["hidden_dim"]), int(spec["latent_dim"]))
        encoder, decoder = encoder_cls(*args), decoder_cls(*args)
    if spec["kind"] == "ae":
        return StackedAutoencoder(encoder, decoder, spec)
    likelihood = Likelihood(spec["likelihood"], float(spec["sigma"]), bool(spec["learn_sigma"]))
    return VAE(encoder, decoder, likelihood, spec)


__all__ = [
    "ARCHITECTURES", "DEFAULT_SPEC", "build_from_spec", "build_model", "check_model", "unwrap", "VAE", "VAEOutput",
    "StackedAutoencoder",
    "MLPEncoder", "MLPDecoder", "ConvEncoder", "ConvDecoder", "ConvKLEncoder", "ConvKLDecoder",
]
