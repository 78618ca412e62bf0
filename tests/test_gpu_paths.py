"""CUDA runs of the students, methods and caches that have no GPU-specific code but must work there: a cache
fingerprinted on the GPU opens on the CPU, pruned and LoRA students and the MiniLM relations train in bf16.
Skipped without a CUDA device (CI); `benchmarks/device_check.py` runs them."""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.gpu


def test_teacher_fingerprint_is_the_same_on_gpu_and_cpu() -> None:
    from kdistill.teachers.cache import model_fingerprint

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(512, 2048), torch.nn.Linear(2048, 512))
    with torch.no_grad():
        m[0].weight.mul_(torch.logspace(-4, 4, 512))
    cpu = model_fingerprint(m)
    assert model_fingerprint(m.cuda()) == cpu


def _run(tmp_path, *overrides: str) -> dict:
    from kdistill import api

    return api.run("llm/tiny", output=tmp_path / "run", progress=False, quiet=True,
                   overrides=["train.mixed_precision=bf16", "baseline=false", "eval.generations=1", *overrides])


def test_pruned_student_on_cuda_in_bf16(tmp_path) -> None:
    r = _run(tmp_path, "student.kind=pruned", "student.target_params=80000", "student.calibration_batches=2")
    assert math.isfinite(r["student"]["metrics"]["perplexity"]) and r["student"]["params"] <= 80000


def test_lora_student_on_cuda_in_bf16(tmp_path) -> None:
    r = _run(tmp_path, "student.lora={r: 4, alpha: 8, target_modules: [q_proj, v_proj, up_proj]}")
    assert math.isfinite(r["student"]["metrics"]["perplexity"])
    assert not list((tmp_path / "run" / "student").glob("adapter_*"))  # saved merged


def test_minilm_relations_with_llm_kd_on_cuda_in_bf16(tmp_path) -> None:
    r = _run(tmp_path, "method={name: minilm, kwargs: {relation_heads: 4, teacher_layer: 2, hidden_weight: 1.0, "
                       "output_method: {name: llm_kd, kwargs: {alpha: 0.5}}}}")
    assert r["method"] == "minilm" and math.isfinite(r["student"]["metrics"]["perplexity"])
