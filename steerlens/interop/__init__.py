"""steerlens with the tools researchers already steer with: their vectors in, as an
:class:`~steerlens.Intervention` that steerlens can diagnose (ρ, audit, matched-share
evaluation) without re-fitting, and residual-stream interventions out, as the GGUF control
vectors llama.cpp serves.

- :func:`from_steering_vector`: a ``steering_vectors.SteeringVector``
  (:mod:`steerlens.interop.steering_vectors`: ``decoder_block`` layer i = ``resid_post.i``);
- :func:`from_control_vector`: a repeng ``ControlVector`` (:mod:`steerlens.interop.repeng`:
  direction i = ``resid_post.i``);
- :func:`from_sae_feature`: a sae-lens SAE's decoder row at its hook
  (:mod:`steerlens.interop.sae_lens`);
- :func:`from_tensor`: a plain vector at a steerlens site (:mod:`steerlens.interop.tensor`);
- :func:`to_gguf_control_vector` / :func:`read_gguf_control_vector`: GGUF control vectors
  (:mod:`steerlens.interop.gguf`: ``direction.l`` = ``resid_post.l@all``, l ≥ 1).

None of the libraries is imported to read its objects, so none is a dependency; with a model,
every import checks layers and widths against it.

>>> import torch
>>> from steerlens.testing import tiny_model
>>> from steerlens.interop import from_tensor
>>> model = tiny_model()
>>> iv = from_tensor(torch.randn(16), "resid_post.1@all", model, scale=4.0)
>>> with iv.apply(model):
...     steered = model(torch.tensor([[1, 2, 3]]))
"""

from steerlens.interop.gguf import read_gguf_control_vector, to_gguf_control_vector
from steerlens.interop.repeng import from_control_vector
from steerlens.interop.sae_lens import from_sae_feature
from steerlens.interop.steering_vectors import LAYER_TYPES, from_steering_vector
from steerlens.interop.tensor import from_tensor

__all__ = [
    "LAYER_TYPES",
    "from_control_vector",
    "from_sae_feature",
    "from_steering_vector",
    "from_tensor",
    "read_gguf_control_vector",
    "to_gguf_control_vector",
]
