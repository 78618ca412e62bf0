"""Black-box distillation pipelines: the teacher is only reachable through an OpenAI-compatible API.

- :func:`kdistill.blackbox.label.run_label_pipeline` (``label``, TAIL 2024)
- :func:`kdistill.blackbox.performance_guided.performance_guided` (PGKD 2024)
- :func:`kdistill.blackbox.rationales.rationales` (Distilling Step-by-Step, 2023)
- :func:`kdistill.blackbox.generate_and_filter.generate_and_filter` (Symbolic KD, 2022)

Recipes run them through the ``blackbox`` task (:mod:`kdistill.tasks.blackbox`). Submodules are not
imported here, so labelling jobs start without loading torch.
"""
