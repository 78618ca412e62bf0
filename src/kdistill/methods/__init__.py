"""Every method module is imported here so that the registry is always full."""

from . import fitnet, hinton_kd, none  # noqa: F401
from . import dkd  # noqa: F401  (classic zoo)
from . import dist  # noqa: F401  (classic zoo)
from . import logit_standardization  # noqa: F401  (classic zoo)
from . import alpha_divergence  # noqa: F401  (classic zoo)
from . import sinkhorn_kd  # noqa: F401  (classic zoo)
from . import attention_transfer  # noqa: F401  (classic zoo)
from . import rkd  # noqa: F401  (classic zoo)
from . import pkt  # noqa: F401  (classic zoo)
from . import similarity_preserving  # noqa: F401  (classic zoo)
from . import nd_loss  # noqa: F401  (classic zoo)
from . import crd  # noqa: F401  (classic zoo)
from . import ofa  # noqa: F401  (classic zoo)
from . import gt_guided_self_distillation  # noqa: F401  (classic zoo)
from . import ensemble  # noqa: F401  (classic zoo)
from . import token_relation_graph  # noqa: F401  (classic zoo)
from . import lelp  # noqa: F401  (classic zoo)
from . import adaptive_fusion  # noqa: F401  (classic zoo)
from . import embedding_kd  # noqa: F401  (embedding distillation)
from . import llm_kd  # noqa: F401  (LLM distillation)
from . import gkd  # noqa: F401  (LLM distillation, on-policy)
from .base import Method, ModelOutput, SetupInfo, label_loss

__all__ = ["Method", "ModelOutput", "SetupInfo", "label_loss"]
