"""The blackbox task on your own texts (data.files): a scripted OpenAI-compatible teacher over loopback, a JSONL
file in tmp_path, the task runner end to end, and the mistakes refused with the fix."""

import json
import re

import pytest

from kdistill.config import load_config
from kdistill.errors import ConfigError, KDistillError
from kdistill.tasks.base import RunContext

LABELS = ["positive", "negative", "neutral"]
KEYWORDS = {"positive": ["great", "lovely", "superb", "wonderful", "excellent"],
            "negative": ["awful", "broken", "terrible", "dull", "rude"],
            "neutral": ["average", "ordinary", "plain", "usual", "typical"]}
NOUNS = ["soup", "hotel", "film", "chair", "service", "train", "book", "phone"]


def keyword_label(text):
    return next((name for name, kws in KEYWORDS.items() if any(k in text for k in kws)), None)


def oracle_app():
    """Answers by keyword: the label request (with top_logprobs when asked), new texts for a class (every
    fourth generation is about another class, so the critic has something to reject). Counts requests."""
    from fastapi import FastAPI

    app = FastAPI()
    app.state.prompts = []

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": "oracle", "object": "model"}]}

    @app.post("/v1/chat/completions")
    def chat(body: dict):
        prompt = body["messages"][-1]["content"]
        app.state.prompts.append(prompt)
        seed = int(body.get("seed") or 0)
        logprobs = None
        if "Answer with the category name only" in prompt:
            lab = keyword_label(re.search(r"Text: (.*)", prompt).group(1))
            content = lab or "no idea"
            if body.get("logprobs") and lab:
                tops = [{"token": c, "logprob": -0.1 if c == lab else -3.0} for c in LABELS]
                logprobs = {"content": [{"token": lab, "logprob": -0.1, "top_logprobs": tops}]}
        elif "Reply with exactly two lines" in prompt:  # rationales
            lab = keyword_label(re.search(r"Text: (.*)", prompt).group(1))
            content = f"Label: {lab}\nReason: it says the thing was {lab}."
        elif "new, different texts" in prompt:  # performance_guided: several per request
            lab = re.search(r"category '(\w+)'", prompt).group(1)
            content = "\n".join(f"{i + 1}. extra {seed} {i}: the {NOUNS[i % 8]} was {KEYWORDS[lab][i % 5]}"
                                for i in range(4))
        else:  # generate_and_filter: one text
            lab = re.search(r"category '(\w+)'", prompt).group(1)
            if seed % 4 == 0:
                lab = LABELS[(LABELS.index(lab) + 1) % 3]
            content = f"made up {seed}: the {NOUNS[seed % 8]} was {KEYWORDS[lab][seed % 5]}"
        return {"choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                             "finish_reason": "stop", "logprobs": logprobs}],
                "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": len(content.split())}}

    return app


@pytest.fixture
def oracle():
    from kdistill.teachers.serve import ServerHandle

    h = ServerHandle(oracle_app())
    yield h
    h.stop()


def write_reviews(path, n=90, **overrides):
    rows = []
    for i in range(n):
        lab = LABELS[i % 3]
        rows.append({"review": f"review {i}: the {NOUNS[i % 8]} was {KEYWORDS[lab][(i // 3) % 5]}", "sentiment": lab})
    for i, row in overrides.items():
        rows[int(i.removeprefix("row"))].update(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def recipe(oracle, files, pipeline="label", **data):
    return {"task": "blackbox", "name": "reviews", "pipeline": pipeline,
            "teacher": {"model": "oracle", "base_url": oracle.base_url if oracle else "http://127.0.0.1:9/v1"},
            "data": {"files": str(files), "text_column": "review", "label_names": LABELS, **data},
            "student": {"epochs": 40}, "label": {"variants": False},
            "generate_and_filter": {"per_class": 8}, "performance_guided": {"rounds": 1}}


def run(cfg, tmp_path, name="run"):
    from kdistill.tasks.blackbox import run_blackbox

    return run_blackbox(load_config(cfg), RunContext(output=tmp_path / name))


def test_label_pipeline_on_a_jsonl_with_gold_labels(oracle, tmp_path):
    write_reviews(tmp_path / "reviews.jsonl")
    rep = run(recipe(oracle, tmp_path / "reviews.jsonl", label_column="sentiment", test_fraction=0.2), tmp_path)
    assert rep == json.loads((tmp_path / "run" / "report.json").read_text())
    assert rep["task"] == "blackbox" and rep["method"] == "label"
    assert rep["data"] == {"name": "files", "classes": LABELS, "train": 63, "val": 9, "test": 18,
                           "reference": "gold"}
    c = rep["teacher"]["counts"]
    assert c["texts"] == c["parsed"] == c["soft"] == 63 and c["malformed"] == 0
    assert rep["teacher"]["metrics"]["accuracy"] == 1.0 == rep["teacher"]["metrics"]["target_accuracy"]
    assert rep["teacher"]["cost"]["requests_sent"] == 63  # the training texts only: gold labels evaluate
    assert rep["student"]["trained_on"] == 63 and rep["student"]["metrics"]["accuracy"] > 0.8
    assert "val_accuracy" in rep["student"]["metrics"] and "accuracy" in rep["baseline"]["metrics"]
    assert all(p.startswith("Classify the text into exactly one of these categories: positive, negative, neutral")
               for p in oracle.app.state.prompts)


def test_label_pipeline_without_gold_labels_compares_with_the_teacher(oracle, tmp_path):
    """No label_column: no validation split is cut, the teacher also labels the test texts, and the student's
    test metric is its agreement with them; a rerun sends nothing."""
    write_reviews(tmp_path / "reviews.jsonl")
    cfg = recipe(oracle, tmp_path / "reviews.jsonl", test_fraction=0.2)
    rep = run(cfg, tmp_path)
    assert rep["data"]["reference"] == "teacher" and (rep["data"]["train"], rep["data"]["val"]) == (72, 0)
    assert rep["data"]["test"] == 18 and rep["data"]["test_without_teacher_label"] == 0
    assert rep["teacher"]["metrics"] == {} and "baseline" not in rep
    assert rep["teacher"]["cost"]["requests_sent"] == 72 + 18
    m = rep["student"]["metrics"]
    assert "accuracy" not in m and m["teacher_agreement"] > 0.8
    again = run(cfg, tmp_path)
    assert again["teacher"]["cost"]["requests_sent"] == 0 and again["teacher"]["cost"]["cached"] == 90


def test_generate_and_filter_on_your_texts_shows_them_as_examples(oracle, tmp_path):
    write_reviews(tmp_path / "reviews.jsonl")
    rep = run(recipe(oracle, tmp_path / "reviews.jsonl", "generate_and_filter", label_column="sentiment"), tmp_path)
    c = rep["counts"]
    assert c["requested"] == c["generated"] == 24 and c["rejected_by_critic"] == 6 and c["kept"] == 18
    assert rep["student"]["metrics"]["accuracy"] > 0.6
    gen = [p for p in oracle.app.state.prompts if "Reply with the text only" in p]
    assert len(gen) == 24 and "dictionary" not in gen[0] and "- review " in gen[0]  # the generic request


def test_rationales_without_gold_labels(oracle, tmp_path):
    write_reviews(tmp_path / "reviews.jsonl", n=30)
    cfg = recipe(oracle, tmp_path / "reviews.jsonl", "rationales", test_fraction=0.2)
    cfg["rationales"] = {"label_only_baseline": False,
                         "student": {"steps": 5, "hidden_size": 32, "vocab_size": 300, "batch_size": 8}}
    rep = run(cfg, tmp_path)
    assert rep["counts"]["kept"] == rep["counts"]["with_rationale"] == 24 and rep["teacher"]["metrics"] == {}
    assert 0.0 <= rep["student"]["metrics"]["teacher_agreement"] <= 1.0 and rep["data"]["test"] == 6


def test_performance_guided_with_gold_labels(oracle, tmp_path):
    write_reviews(tmp_path / "reviews.jsonl")
    rep = run(recipe(oracle, tmp_path / "reviews.jsonl", "performance_guided", label_column="sentiment"), tmp_path)
    assert rep["rounds"][0]["train_size"] == 72 and "accuracy" in rep["student"]["metrics"]
    assert rep["teacher"]["label_counts"]["parsed"] == 72


# ------------------------------------------------------------------------------------------- mistakes


def test_a_pipeline_that_needs_gold_labels_is_refused_when_the_recipe_loads(tmp_path):
    with pytest.raises(ConfigError, match=r"'performance_guided' needs gold labels .* set data.label_column"):
        load_config(recipe(None, tmp_path / "x.jsonl", "performance_guided"))
    load_config(recipe(None, tmp_path / "x.jsonl", "rationales"))  # works without gold labels


@pytest.mark.parametrize("names, match", [(["positive"], "at least two labels"), (None, "needs data.label_names"),
                                          (["a", "A"], "differ in more than case"), (["a", " "], "no empty label")])
def test_label_names_are_checked_when_the_recipe_loads(tmp_path, names, match):
    cfg = recipe(None, tmp_path / "x.jsonl")
    cfg["data"]["label_names"] = names
    if names is None:
        del cfg["data"]["label_names"]
    with pytest.raises(ConfigError, match=match):
        load_config(cfg)


def test_builtin_name_and_own_data_fields_do_not_mix(tmp_path):
    with pytest.raises(ConfigError, match="built-in data set; label_names describe your own data"):
        load_config({"task": "blackbox", "teacher": {"model": "m"},
                     "data": {"name": "wordnet_supersense", "label_names": LABELS}})
    with pytest.raises(ConfigError, match="data.kwargs"):
        load_config({**recipe(None, tmp_path / "x.jsonl"), "data": {"files": "x.jsonl", "label_names": LABELS,
                                                                     "kwargs": {"classes": LABELS}}})


def _refused(cfg, tmp_path, oracle, match):
    with pytest.raises(KDistillError, match=match) as e:
        run(cfg, tmp_path)
    assert oracle.app.state.prompts == [] and not (tmp_path / "run" / "report.json").exists()  # before any request
    return str(e.value)


def test_a_misspelt_text_column_names_close_matches(oracle, tmp_path):
    write_reviews(tmp_path / "reviews.jsonl")
    cfg = recipe(oracle, tmp_path / "reviews.jsonl")
    cfg["data"]["text_column"] = "reveiw"
    msg = _refused(cfg, tmp_path, oracle, "column 'reveiw' is not in the data")
    assert "Did you mean 'review'" in msg and "Columns found: review, sentiment" in msg


def test_an_empty_text_is_named_with_its_row(oracle, tmp_path):
    write_reviews(tmp_path / "reviews.jsonl", row3={"review": "  "})
    _refused(recipe(oracle, tmp_path / "reviews.jsonl", test_fraction=0.0), tmp_path, oracle,
             r"row 4, column 'review' \(data.text_column\): got '  ', expected a non-empty text")


def test_a_gold_label_outside_label_names_is_named(oracle, tmp_path):
    write_reviews(tmp_path / "reviews.jsonl", row5={"sentiment": "Negative"})
    msg = _refused(recipe(oracle, tmp_path / "reviews.jsonl", label_column="sentiment", validation_fraction=0.0,
                          test_fraction=0.0), tmp_path, oracle, r"row 6, column 'sentiment' \(data.label_column\): "
                   r"got 'Negative', expected one of data.label_names")
    assert "Did you mean 'negative'" in msg
    write_reviews(tmp_path / "reviews.jsonl", row5={"sentiment": 1})
    _refused(recipe(oracle, tmp_path / "reviews.jsonl", label_column="sentiment", validation_fraction=0.0,
                    test_fraction=0.0), tmp_path, oracle, "got 1, expected one of data.label_names")
