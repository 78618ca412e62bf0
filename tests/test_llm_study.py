"""benchmarks/llm_study.py without running a model: each row's overrides load as a valid recipe, cacheable rows pin
the shared top-k cache, sampled rows the sampled one, and rows that need a sampled cache are refused up front."""

import importlib.util
import json
from pathlib import Path

import pytest

from kdistill.config import load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("llm_study", ROOT / "benchmarks" / "llm_study.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _o(study, row, **kw):
    args = dict(seed=1, tokens=1000, cache="runs/topk", eval_every=30, student=None, sampled_cache="runs/sampled")
    return {k: json.loads(v) for k, v in (x.split("=", 1) for x in study.overrides(row, **{**args, **kw}))}


def test_rows_pin_their_cache_and_load(study):
    assert _o(study, "forward_kl")["cache.mode"] == "topk" and _o(study, "forward_kl")["cache.dir"] == "runs/topk"
    both = _o(study, "forward_kl_sampled+ce_0.5")
    assert both["cache.mode"] == "sampled" and both["cache.dir"] == "runs/sampled" and both["cache.k"] == 32
    assert both["method"]["kwargs"]["alpha"] == 0.5 and both["method"]["kwargs"]["loss"] == "forward_kl"
    assert _o(study, "cross_entropy")["cache"] is None and _o(study, "gkd_0.5")["cache"] is None
    for row in study.ROWS:
        cfg = load_config(study.RECIPE, [f"{k}={json.dumps(v)}" for k, v in _o(study, row).items()])
        assert cfg.seed == 1
        assert (cfg.cache is None) == (study.ROWS[row].get("cache", "topk") is None)


def test_sampled_rows_without_a_sampled_cache_are_refused_before_anything_runs(study, tmp_path, capsys):
    with pytest.raises(SystemExit):
        study.main(["--out", str(tmp_path / "out"), "--cache", "c", "--rows", "cross_entropy,forward_kl_sampled"])
    err = capsys.readouterr().err
    assert "forward_kl_sampled need --sampled-cache" in err and "cache.mode=sampled" in err
    assert not (tmp_path / "out").exists()


def test_a_started_run_is_resumed_not_wiped(study, tmp_path, monkeypatch):
    """A row stopped before its first checkpoint (sequence-level KD while it stores the teacher's generations) has
    a run folder but no ``work/``; restarting it without --resume would empty the folder and lose the generations."""
    import argparse
    import subprocess

    calls = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: (calls.append(cmd), argparse.Namespace(returncode=0))[1])
    args = argparse.Namespace(recipe=study.RECIPE, tokens=1000, cache=None, eval_every=30, student=None,
                              sampled_cache=None)
    study.run_one(tmp_path, "sequence_kd", 0, args)
    assert "--resume" not in calls[-1]  # nothing there yet: a fresh run
    (tmp_path / "sequence_kd" / "seed0").mkdir(parents=True)
    (tmp_path / "sequence_kd" / "seed0" / "config.json").write_text("{}")
    study.run_one(tmp_path, "sequence_kd", 0, args)
    assert calls[-1][-1] == "--resume"
