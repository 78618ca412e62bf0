"""kdistill: knowledge distillation toolkit.

Public API: :func:`run`, :func:`evaluate`, :func:`export`, :func:`audit`, :func:`load_config`,
:func:`list_methods`, :func:`sample` (draw from a diffusion run),
:func:`select` (the training subset to distil on), :func:`design` (the student to distil into; and
``cache`` for offline teacher targets, in the LLM task).
"""

__version__ = "0.1.0"

from .api import audit, design, evaluate, export, list_all, list_methods, run, sample, select  # noqa: E402
from .config import load_config  # noqa: E402

__all__ = ["audit", "design", "evaluate", "export", "list_all", "list_methods", "load_config", "run", "sample",
           "select", "__version__"]
