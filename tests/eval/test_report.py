import json

import torch

from kdistill.eval.metrics import agreement, classification_metrics, latency_ms
from kdistill.eval.report import comparison_rows, verdicts, write_report


def fake_report():
    return {
        "recipe": "r", "task": "classification", "method": "hinton_kd", "seed": 0, "wall_seconds": 1.5,
        "teacher": {"params": 1000, "latency_ms": 10.0, "metrics": {"accuracy": 0.95}},
        "student": {"params": 100, "latency_ms": 1.0, "metrics": {"accuracy": 0.80}, "augment": {"name": "mixup"}},
        "baseline": {"params": 100, "metrics": {"accuracy": 0.70}},
        "variants": {"plain": {"metrics": {"accuracy": 0.698}}},
        "agreement": {"top1_agreement": 0.9},
    }


def test_rows_compression_speedup_and_gain():
    rows = {r["name"]: r for r in comparison_rows(fake_report())}
    main = rows["student: hinton_kd + mixup"]
    assert main["compression"] == 10.0 and main["speedup"] == 10.0
    assert abs(main["gain_vs_baseline"] - 0.10) < 1e-9
    assert rows["plain"]["params"] == 100 and rows["plain"]["latency_ms"] == 1.0  # variants share the student's
    assert rows["teacher"]["gain_vs_baseline"] != rows["teacher"]["gain_vs_baseline"]  # NaN: not applicable


def test_verdicts_say_where_there_is_no_gain():
    v = verdicts(comparison_rows(fake_report()))
    assert any("+10.0 points" in s for s in v)
    assert any(s.startswith("plain: no real gain") for s in v)


def test_write_report_files(tmp_path):
    curves = {"teacher": [{"step": 1, "accuracy": 0.5}, {"step": 2, "accuracy": 0.9}], "baseline": []}
    paths = write_report(fake_report(), tmp_path, curves=curves)
    assert json.loads(paths["json"].read_text())["method"] == "hinton_kd"
    md = paths["md"].read_text()
    assert "| teacher |" in md and "no real gain" in md and "curves.png" in md
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"


def test_metrics():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    labels = torch.tensor([0, 1, 1])
    m = classification_metrics(logits, labels)
    assert abs(m["accuracy"] - 2 / 3) < 1e-6 and m["loss"] > 0
    a = agreement(logits, logits)
    assert a["top1_agreement"] == 1.0 and abs(a["kl_teacher_student"]) < 1e-6
    assert latency_ms(lambda: sum(range(100)), repeats=3, warmup=1) > 0


def test_perplexity_is_lower_is_better_and_reported_relatively():
    r = fake_report()
    r["task"] = "llm"
    r["teacher"]["metrics"] = {"perplexity": 61.6}
    r["student"]["metrics"] = {"perplexity": 260.3}
    r["baseline"]["metrics"] = {"perplexity": 280.3}
    r["variants"] = {"worse": {"metrics": {"perplexity": 290.0}}}
    rows = {x["name"]: x for x in comparison_rows(r, "perplexity")}
    assert abs(rows["student: hinton_kd + mixup"]["gain_vs_baseline"] - 20.0) < 1e-9  # positive = better
    assert rows["worse"]["gain_vs_baseline"] < 0
    v = verdicts(list(rows.values()), "perplexity")
    assert any("7.1% lower than the baseline's 280.3000" in s for s in v)
    assert any(s.startswith("worse: no real gain") for s in v)
