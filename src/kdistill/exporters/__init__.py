"""Student-only export (safetensors + config; HF folders and sentence-transformers folders per task)."""

from .classifier import export_classifier, load_classifier, save_classifier

__all__ = ["export_classifier", "load_classifier", "save_classifier"]
