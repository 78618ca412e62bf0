"""Model families registered in ``MODELS`` (classifier nets here; LLM and encoder builders live in
``students/`` and ``zoo.py``)."""

from .classifiers import CNN, MLP, build_cnn, build_mlp, count_params, predict_logits
from .diffusion import build_mlp_denoiser, build_unet_denoiser  # noqa: F401  (registers the denoisers)
from .hf import HFSequenceClassifier, build_hf  # noqa: F401  (registers "hf")
from .transformer1d import Transformer1D, build_transformer1d  # noqa: F401  (registers "transformer1d")

__all__ = ["CNN", "MLP", "build_cnn", "build_mlp", "count_params", "predict_logits"]
