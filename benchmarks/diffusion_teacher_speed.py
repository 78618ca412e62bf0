"""Seconds per training step of a diffusion recipe's teacher, and the extrapolation to its full training: the teacher
is trained for WARMUP and for WARMUP + STEPS steps in a temporary folder (the cache is not touched) and the difference
of the two training times is divided by STEPS, so set-up costs cancel. Prints JSON. Run it on an otherwise idle
machine: `python benchmarks/diffusion_teacher_speed.py [--recipe diffusion/denoising] [--steps 150]`."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from kdistill.config import load_config
from kdistill.data.generative import load_generative
from kdistill.models.diffusion import DiffusionSchedule
from kdistill.tasks.base import RunContext
from kdistill.tasks.diffusion import _get_teacher
from kdistill.train import make_accelerator


def train_seconds(recipe: str, steps: int) -> float:
    cfg = load_config(recipe, [f"teacher.train.max_steps={steps}", "teacher.reuse=false",
                               "teacher.train.checkpoint_every=0"])
    data = load_generative(cfg.data.name, **cfg.data.kwargs)
    with tempfile.TemporaryDirectory() as d:
        _, hist, _, _ = _get_teacher(cfg, data, DiffusionSchedule(**cfg.schedule.model_dump()), make_accelerator(),
                                     RunContext(Path(d), False, False))
    return float(hist["seconds"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="diffusion/denoising")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--steps", type=int, default=150)
    args = ap.parse_args()
    full = load_config(args.recipe).teacher.train.max_steps
    per = (train_seconds(args.recipe, args.warmup + args.steps) - train_seconds(args.recipe, args.warmup)) / args.steps
    print(json.dumps({"recipe": args.recipe, "threads": torch.get_num_threads(), "seconds_per_step": round(per, 4),
                      "teacher_steps": full, "extrapolated_minutes": round(per * full / 60, 1)}))


if __name__ == "__main__":
    main()
