"""recipes/examples/blackbox_jsonl: your texts from a JSONL file labelled by an OpenAI-compatible teacher."""

import json

import pytest

LABELS = ["billing", "bug", "feature"]
WORDS = {"billing": ["invoice", "refund", "charge"], "bug": ["crash", "error", "freeze"],
         "feature": ["dark mode", "export", "shortcut"]}


@pytest.fixture
def api_teacher():
    """A scripted OpenAI-compatible teacher on a loopback port: answers the label request by keyword."""
    from fastapi import FastAPI

    from kdistill.teachers.serve import ServerHandle

    app = FastAPI()

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": "ticket-teacher", "object": "model"}]}

    @app.post("/v1/chat/completions")
    def chat(body: dict):
        text = body["messages"][-1]["content"].split("Text: ", 1)[1]
        lab = next(n for n, ws in WORDS.items() if any(w in text for w in ws))
        return {"choices": [{"index": 0, "message": {"role": "assistant", "content": lab}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 1}}

    h = ServerHandle(app)
    yield h
    h.stop()


def write_tickets(folder, n=60):
    rows = [{"text": f"ticket {i}: my {WORDS[LABELS[i % 3]][(i // 3) % 3]} problem", "label": LABELS[i % 3]}
            for i in range(n)]
    (folder / "tickets.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_blackbox_jsonl_with_an_api_teacher(tmp_path, example, api_teacher):
    write_tickets(tmp_path)
    teacher = [f"teacher.base_url={api_teacher.base_url}", "teacher.model=ticket-teacher"]
    r, rep = example("examples/blackbox_jsonl", *teacher)
    assert r.exit_code == 0, r.output
    assert rep["data"]["train"] == 42 and rep["data"]["test"] == 12 and rep["data"]["reference"] == "gold"
    assert rep["teacher"]["metrics"]["accuracy"] == 1.0 and rep["teacher"]["counts"]["parsed"] == 42
    assert rep["student"]["metrics"]["accuracy"] > 0.8
    # without gold labels: the teacher labels the test split too, the student is compared with it
    r, rep = example("examples/blackbox_jsonl", *teacher, "data.label_column=null", output="nogold")
    assert r.exit_code == 0, r.output
    assert rep["data"]["reference"] == "teacher" and rep["teacher"]["cost"]["requests_sent"] == 48 + 12
    assert rep["student"]["metrics"]["teacher_agreement"] > 0.8


def test_a_label_outside_label_names_is_refused(tmp_path, example, api_teacher):
    write_tickets(tmp_path)
    r, _ = example("examples/blackbox_jsonl", f"teacher.base_url={api_teacher.base_url}",
                   "data.label_names=[billing, bug]")
    assert r.exit_code == 2 and "got 'feature', expected one of data.label_names" in r.output
