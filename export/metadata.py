"""The metadata a fastvae decoder file carries (ONNX ``metadata_props``, all strings).

Torch-free and onnx-free: the sampler reads these keys through onnxruntime only.

Keys (values are strings; JSON where noted):

``fastvae_format``          ``"fastvae-decoder"`` (marks a file as a fastvae decoder)
``fastvae_format_version``  ``"1"``
``fastvae_version``         the fastvae version that wrote the file
``latent_dim``              size of the input ``z`` (batch, latent_dim), z ~ N(0, I)
``latent_shape``            JSON list, one example's z: ``[latent_dim]``, or ``[c, h, w]`` for a spatial
                            decoder (z (batch, c, h, w), h and w symbolic; this is the training size)
``downsample``              spatial decoders: f, output pixels per latent position (H = h * f)
``output_shape``            JSON list, one example's shape, e.g. ``[1, 8, 8]``
``input_name``              ``"z"``
``mean_output``             ``"mean"``: E[x|z], ready to use (sigmoid already applied)
``params_output``           ``"params"``: the raw decoder output (logits or means)
``output_transform``        how params become means: ``"sigmoid"`` or ``"identity"``
``likelihood``              ``"bernoulli"`` | ``"gaussian"`` | ``"laplace"`` | ``"none"`` (stacked autoencoder)
``sample``                  how to draw x ~ p(x|z) from the mean: ``"bernoulli"`` (x = u < mean),
                            ``"gaussian"`` (x = mean + sigma * eps), ``"laplace"`` (x = mean + Laplace(0,
                            sigma) noise) or ``"none"`` (deterministic)
``sigma``                   the Gaussian likelihood's standard deviation / the Laplace scale
``precision``               ``"fp32"`` | ``"fp16"`` | ``"int8"``
``max_abs_error_vs_torch``  max |onnxruntime - torch| of ``params``: the fp32 file's over the
                            validation batches, an fp16/int8 file's as ``max_abs_error_vs_fp32``
``max_abs_error_vs_fp32``   fp16/int8 files: max |variant - torch's fp32 decoder| of ``params`` on
                            1000 z ~ N(0, I) (spatial decoders: fewer)
``max_abs_error_mean_vs_fp32``  the same for ``mean``
``model_spec``              JSON: the model spec the decoder was built from (the settings its
                            model family reads)
``source``                  the run folder / checkpoint it came from (an absolute path), or
                            ``"<in-memory module>"``; the service's /metadata shows its last part
``exporter``                which torch.onnx exporter and torch version wrote the graph
"""

from __future__ import annotations

import os

FORMAT = "fastvae-decoder"
FORMAT_VERSION = 1
INPUT_NAME = "z"
MEAN_OUTPUT = "mean"
PARAMS_OUTPUT = "params"

SAMPLE_KINDS = ("bernoulli", "gaussian", "laplace", "none")
PRECISIONS = ("fp32", "fp16", "int8")

# what each likelihood means for the decoder's raw output
LIKELIHOOD_RULES = {
    # likelihood: (output_transform, sample)
    "bernoulli": ("sigmoid", "bernoulli"),
    "gaussian": ("identity", "gaussian"),
    "laplace": ("identity", "laplace"),
    "none": ("sigmoid", "none"),  # stacked autoencoder: decode() = sigmoid(decoder(z))
}


def client_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """The decoder file's metadata as clients see it (the service's /metadata, a Triton
    config's parameters): ``source`` cut to the run folder's name, or a checkpoint's path from
    its run folder on (the file keeps the absolute path; a client has no use for the exporting
    machine's folders, and they are not its business)."""
    source = metadata.get("source")
    if not source or not os.path.isabs(source):
        return metadata
    parts = [p for p in source.replace("\\", "/").split("/") if p]
    # a checkpoint: from its run folder on (RUN/checkpoints/last.ckpt, RUN/x.ckpt)
    keep = 1 if not source.endswith(".ckpt") else 3 if len(parts) > 2 and parts[-2] == "checkpoints" else 2
    return {**metadata, "source": "/".join(parts[-keep:]) or source}
