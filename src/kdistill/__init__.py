"""kdistill: knowledge distillation toolkit.

Public API: :func:`run`, :func:`evaluate`, :func:`export`, :func:`load_config`, :func:`list_methods`
(and ``cache`` for offline teacher targets, in the LLM task).
"""

__version__ = "0.1.0"

from .api import evaluate, export, list_all, list_methods, run  # noqa: E402
from .config import load_config  # noqa: E402

__all__ = ["evaluate", "export", "list_all", "list_methods", "load_config", "run", "__version__"]
