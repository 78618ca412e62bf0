import json
import math
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from kdistill.blackbox.data import TextData
from kdistill.blackbox.generate_and_filter import generate_and_filter
from kdistill.blackbox.label import label, parse_label, run_label_pipeline, soft_label
from kdistill.blackbox.performance_guided import parse_examples, performance_guided
from kdistill.blackbox.rationales import parse_rationale, rationales
from kdistill.teachers.api import APITeacher, TeacherReply
from kdistill.teachers.serve import Faults, ServerHandle
from kdistill.teachers.store import ResponseStore

CLASSES = ["animal", "plant", "food"]
KEYWORDS = {"animal": ["dog", "cat", "horse", "bird", "fish"], "plant": ["tree", "fern", "flower", "grass", "moss"],
            "food": ["bread", "cheese", "soup", "rice", "cake"]}


def synthetic(n_per_class=12, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for c, name in enumerate(CLASSES):
        for i in range(3 * n_per_class):
            kw = KEYWORDS[name][i % 5]
            rows.append((f"item{c}x{i}: a {kw} that is {rng.choice(['big', 'small', 'old', 'new'])}", c))
    rng.shuffle(rows)
    parts = [rows[i::3] for i in range(3)]
    return TextData("synthetic", CLASSES, *[v for p in parts for v in ([t for t, _ in p], [int(y) for _, y in p])])


# ----------------------------------------------------------------------------------------- parsers


def test_parse_label_is_strict():
    assert parse_label("animal", CLASSES) == 0
    assert parse_label("  Plant.", CLASSES) == 1
    assert parse_label("Category: FOODS", CLASSES) == 2
    assert parse_label("It is a plant, not an animal", CLASSES) is None  # two labels: rejected
    assert parse_label("vegetable", CLASSES) is None
    assert parse_label("", CLASSES) is None
    assert parse_label("animals", ["animal", "plant"]) == 0


def test_soft_label_from_top_logprobs():
    rep = TeacherReply("ok", text="animal", tokens=["animal"], token_logprobs=[math.log(0.6)],
                       top_logprobs=[{"animal": math.log(0.6), " plant": math.log(0.2), "xyz": math.log(0.1),
                                      "fo": math.log(0.05)}])
    q = soft_label(rep, CLASSES)
    np.testing.assert_allclose(q, np.array([0.6, 0.2, 0.05]) / 0.85, rtol=1e-5)
    # leading whitespace tokens are skipped
    lead = TeacherReply("ok", tokens=["\n", "plant"], top_logprobs=[{"\n": 0.0}, {"plant": -0.1, "food": -3.0}])
    assert int(np.argmax(soft_label(lead, CLASSES))) == 1
    # the answer starts with another word: label mass 0.05 < min_label_mass -> no soft label ...
    other = TeacherReply("ok", tokens=["The"], top_logprobs=[{"The": -0.1, "animal": math.log(0.05)}])
    assert soft_label(other, CLASSES) is None
    # ... but an off-label answer with enough mass on the labels still gives one (verbaliser)
    fruit = TeacherReply("ok", tokens=[" fruit"], top_logprobs=[{" fruit": math.log(0.5), " food": math.log(0.3),
                                                                 " plant": math.log(0.1)}])
    np.testing.assert_allclose(soft_label(fruit, CLASSES), [0.0, 0.25, 0.75], rtol=1e-5)
    assert soft_label(fruit, CLASSES, min_label_mass=0.5) is None
    assert soft_label(TeacherReply("ok", text="food"), CLASSES) is None  # no logprobs offered


def test_parse_rationale_and_examples():
    assert parse_rationale("Label: Plant\nReason: it has leaves.", CLASSES) == (1, "it has leaves.")
    assert parse_rationale("label:food", CLASSES) == (2, None)
    assert parse_rationale("I think it is nice", CLASSES) == (None, None)
    assert parse_examples("1. oak: a tree\n- fern: a green plant\n\nx\n* rose: a flower") == [
        "oak: a tree", "fern: a green plant", "rose: a flower"]


# ------------------------------------------------------------------------ a scripted (oracle) teacher


def oracle_app(wrong_every=4):
    """An OpenAI-compatible app whose answers follow the keyword rules above (so pipeline accounting can
    be checked exactly); a real HTTP server over loopback, not an LM."""
    from fastapi import FastAPI

    app = FastAPI()

    def kw_label(text):
        for name, kws in KEYWORDS.items():
            if any(k in text for k in kws):
                return name
        return None

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": "oracle", "object": "model"}]}

    @app.post("/v1/chat/completions")
    def chat(body: dict):
        prompt = body["messages"][-1]["content"]
        m = re.search(r"Text: (.*)", prompt)
        seed = int(body.get("seed") or 0)
        logprobs = None
        if "Reply with exactly two lines" in prompt:
            lab = kw_label(m.group(1))
            content = f"Label: {lab}\nReason: it mentions a kind of {lab}."
        elif "Answer with the category name only" in prompt:
            lab = kw_label(m.group(1))
            content = lab or "no idea"
            if body.get("logprobs") and lab:
                tops = [{"token": c, "logprob": -0.1 if c == lab else -3.0} for c in CLASSES]
                logprobs = {"content": [{"token": lab, "logprob": -0.1, "top_logprobs": tops}]}
        elif "new, different" in prompt:
            lab = re.search(r"category '(\w+)'", prompt).group(1)
            content = "\n".join(f"{i + 1}. gen{seed}x{i}{lab}: a {KEYWORDS[lab][i % 5]} of note" for i in range(4))
        else:  # generate one entry; every wrong_every-th one is about another class (the critic must catch it)
            lab = re.search(r"category '(\w+)'", prompt).group(1)
            if seed % wrong_every == 0:
                lab = CLASSES[(CLASSES.index(lab) + 1) % 3]
            content = f"word{seed}: a {KEYWORDS[lab][seed % 5]} seen somewhere"
        return {"choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                             "finish_reason": "stop", "logprobs": logprobs}],
                "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": len(content.split())}}

    return app


@pytest.fixture
def oracle():
    h = ServerHandle(oracle_app())
    yield h
    h.stop()


def test_label_pipeline_with_oracle_teacher(oracle, tmp_path):
    data = synthetic()
    t = APITeacher(oracle.base_url, "oracle", store=ResponseStore(tmp_path / "s.sqlite"))
    rep = run_label_pipeline(data, t, student_kwargs={"epochs": 40}, variants=False, baseline=False)
    c = rep["teacher"]["counts"]
    assert c["texts"] == c["parsed"] == c["soft"] == len(data.train_texts) and c["malformed"] == 0
    assert rep["teacher"]["metrics"]["accuracy"] == 1.0 == rep["teacher"]["metrics"]["target_accuracy"]
    assert rep["student"]["trained_on"] == len(data.train_texts)
    assert rep["student"]["metrics"]["accuracy"] > 0.8
    assert rep["teacher"]["cost"]["requests_sent"] == len(data.train_texts)


def test_rationales_pipeline_trains_multitask_lm_student(oracle):
    data = synthetic(n_per_class=8)
    t = APITeacher(oracle.base_url, "oracle")
    rep = rationales(data, t, student_kwargs={"steps": 25, "hidden_size": 32, "vocab_size": 300, "batch_size": 8},
                     label_only_baseline=False)
    assert rep["counts"]["kept"] == rep["counts"]["with_rationale"] == len(data.train_texts)
    assert rep["teacher"]["metrics"]["accuracy_parsed"] == 1.0
    h = rep["student"]["history"]
    assert h[-1]["rationale_loss"] > 0 and h[-1]["label_loss"] < h[0]["label_loss"]
    assert 0.0 <= rep["student"]["metrics"]["accuracy"] <= 1.0


def test_generate_and_filter_counts_and_critic(oracle):
    data = synthetic()
    t = APITeacher(oracle.base_url, "oracle")
    rep = generate_and_filter(data, t, per_class=8, student_kwargs={"epochs": 40})
    c = rep["counts"]
    assert c["requested"] == 24 and c["generated"] == 24
    # seeds 0 and 4 of every class are about another class: the teacher critic rejects exactly those
    assert c["rejected_by_critic"] == 6 and c["kept"] == 18
    assert rep["student"]["metrics"]["accuracy"] > 0.6
    none = generate_and_filter(data, t, per_class=8, critic="none", student_kwargs={"epochs": 40})
    assert none["counts"]["kept"] == 24 and none["counts"]["rejected_by_critic"] == 0


def test_performance_guided_adds_examples_for_wrong_classes(oracle):
    data = synthetic()
    t = APITeacher(oracle.base_url, "oracle")
    # start from a deliberately poor labelled set: 3 examples, all from one class plus one each
    init = [data.train_texts[i] for i in range(3)]
    targets = np.eye(3, dtype=np.float32)[[data.train_labels[i] for i in range(3)]]
    rep = performance_guided(data, t, init_texts=init, init_targets=targets, rounds=2, patience=2,
                             student_kwargs={"epochs": 40})
    r = rep["rounds"]
    assert r[0]["train_size"] == 3
    assert rep["counts"]["accepted"] > 0 and r[1]["train_size"] == 3 + r[0]["added"]
    assert rep["student"]["metrics"]["val_accuracy"] >= r[0]["val_accuracy"]


# ----------------------------------------------------------------------- the real (tiny LM) server


def test_label_pipeline_against_tiny_llama_server(serve, tiny_lm_dir):
    """End to end against `kdistill serve` with a random tiny Llama. logit_bias restricts the first token to
    the label names, so every answer parses; without it, malformed answers are counted, not fatal."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    ids = [tok(" " + c, add_special_tokens=False)["input_ids"] for c in CLASSES]
    assert all(len(i) == 1 for i in ids), ids  # " animal", " plant", " food" are single tokens
    first = {i[0] for i in ids}
    h = serve()
    data = synthetic(n_per_class=6)
    t = APITeacher(h.base_url, "tiny-llama")
    rep = run_label_pipeline(data, t, label_kwargs={"max_tokens": 1, "extra": {"logit_bias": {
        str(i): 100 for i in first}}}, student_kwargs={"epochs": 5})
    c = rep["teacher"]["counts"]
    assert c["parsed"] == c["texts"] == len(data.train_texts) and c["soft"] == c["texts"]
    assert rep["student"]["trained_on"] == len(data.train_texts)
    assert 0 <= rep["student"]["metrics"]["accuracy"] <= 1
    res = label(data.train_texts[:6], CLASSES, t, max_tokens=3)  # random model, no bias: mostly malformed
    assert res.counts["parsed"] + res.counts["malformed"] == 6 and res.counts["failed_requests"] == 0


def test_label_job_survives_500s_malformed_bodies_and_timeouts(serve):
    h = serve(faults=Faults(error_every=4, malformed_every=7, delay_every=9, delay_s=6.0))
    data = synthetic(n_per_class=4)
    # see test_500s_and_malformed_bodies_are_retried
    t = APITeacher(h.base_url, "tiny-llama", timeout=2.0, backoff_base=0.01, backoff_max=0.05, max_retries=30)
    res = label(data.train_texts, CLASSES, t, max_tokens=2)
    assert res.counts["answered"] == len(data.train_texts) and res.counts["failed_requests"] == 0
    assert t.cost()["retries"] >= 3


JOB = """
import json, sys
from kdistill.blackbox.label import label
from kdistill.teachers.api import APITeacher
base, store, texts = sys.argv[1], sys.argv[2], json.load(open(sys.argv[3]))
t = APITeacher(base, "tiny-llama", store=store, concurrency=2)
t.preflight()
res = label(texts, ["animal", "plant", "food"], t, max_tokens=2)
print(json.dumps({"cost": t.cost(), "counts": res.counts}))
"""


def test_kill_9_and_resume_loses_no_row_and_repeats_no_request(serve, tmp_path):
    h = serve(faults=Faults(delay_every=1, delay_s=0.1), record_requests=True)  # slow: kill it half-way
    log = h.app.state.request_log
    texts = [f"entry {i}: a thing numbered {i}" for i in range(40)]
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    store_path = tmp_path / "job.sqlite"
    cmd = [sys.executable, "-c", JOB, h.base_url, str(store_path), str(tmp_path / "texts.json")]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if store_path.exists():
            with ResponseStore(store_path) as s:
                if len(s) >= 10:
                    break
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    time.sleep(0.5)  # let requests that were in flight at the kill finish on the server side
    before = {r["request"]["messages"][0]["content"] for r in ResponseStore(store_path).rows()}
    n_before_log = len(log)
    assert 10 <= len(before) < 40, len(before)  # killed mid-job
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    phase2 = [content for _path, content in log[n_before_log:]]
    assert not set(phase2) & before  # nothing already stored was sent again
    assert len(phase2) == len(set(phase2)) == 40 - len(before)  # and nothing twice
    assert result["cost"]["cached"] == len(before) and result["cost"]["requests_sent"] == 40 - len(before)
    final = ResponseStore(store_path)
    assert len(final) == 40  # no lost rows
    contents = {r["request"]["messages"][0]["content"] for r in final.rows()}
    assert all(any(t in c for c in contents) for t in texts)
    assert result["counts"]["answered"] == 40


def test_label_result_target_kinds():
    from kdistill.blackbox.label import LabelResult

    soft = np.array([0.2, 0.5, 0.3], np.float32)
    r = LabelResult(labels=[0, -1, 2, -1], soft=[None, soft, soft, None], answers=[""] * 4, statuses=["ok"] * 4)
    keep, q = r.targets(3, "soft")
    assert keep == [0, 1, 2] and np.allclose(q, [[1, 0, 0], soft, soft])
    keep, q = r.targets(3, "argmax")
    assert keep == [0, 1, 2] and np.allclose(q, [[1, 0, 0], [0, 1, 0], [0, 1, 0]])
    keep, q = r.targets(3, "parsed")
    assert keep == [0, 2] and np.allclose(q, [[1, 0, 0], [0, 0, 1]])
    with pytest.raises(Exception, match="expected one of"):
        r.targets(3, "mixed")


def test_other_pipelines_end_to_end_against_tiny_llama_server(serve):
    """rationales, generate_and_filter and performance_guided against the real `kdistill serve` (random tiny
    Llama): its answers are mostly unusable, and every pipeline must finish, count them and lose none."""
    h = serve()
    data = synthetic(n_per_class=4)
    t = APITeacher(h.base_url, "tiny-llama")
    rat = rationales(data, t, student_kwargs={"steps": 3, "hidden_size": 32, "vocab_size": 300, "batch_size": 8},
                     label_only_baseline=False)
    c = rat["counts"]
    assert c["texts"] == len(data.train_texts) and c["failed_requests"] == 0
    assert c["kept"] + c["malformed_label"] <= c["texts"]
    gen = generate_and_filter(data, t, per_class=2, student_kwargs={"epochs": 3})
    c = gen["counts"]
    assert c["requested"] == 6 and c["failed_requests"] == 0
    assert c["kept"] + c["rejected_by_critic"] == c["generated"]
    init = [data.train_texts[i] for i in range(3)]
    targets = np.eye(3, dtype=np.float32)[[data.train_labels[i] for i in range(3)]]
    pg = performance_guided(data, t, init_texts=init, init_targets=targets, rounds=1, patience=1,
                            student_kwargs={"epochs": 3})
    r = pg["rounds"]
    assert pg["counts"]["failed_requests"] == 0 and r[0]["train_size"] == 3
    assert len(r) >= 2 and r[1]["train_size"] == 3 + r[0]["added"] and pg["counts"]["accepted"] == r[0]["added"]
