"""Every method module is imported here so that the registry is always full."""

from . import fitnet, hinton_kd, none  # noqa: F401
from .base import Method, ModelOutput, SetupInfo, label_loss

__all__ = ["Method", "ModelOutput", "SetupInfo", "label_loss"]
