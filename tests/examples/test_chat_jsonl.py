"""recipes/examples/chat_jsonl: chat conversations from a JSONL file, a teacher folder and a smaller pretrained
student folder of the same tokenizer; loss on assistant tokens only."""

import json
import math

import pytest

QUESTIONS = ["what is the light", "who made the earth", "what is the firmament", "what did god see",
             "what came in the evening", "what is in the waters"]
ANSWERS = ["the light is day", "god made the earth", "the firmament is heaven", "god saw that it was good",
           "the evening and the morning", "the moving creature that hath life"]


def write_models_and_chats(folder):
    from kdistill.teachers.tiny import tiny_llama, train_tokenizer

    texts = QUESTIONS + ANSWERS
    tok = train_tokenizer(texts * 4, vocab_size=300)
    for name, layers, seed in (("teacher_lm", 4, 0), ("student_lm", 2, 1)):
        lm = tiny_llama(len(tok), num_layers=layers, seed=seed, pad_token_id=tok.pad_token_id,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        lm.save_pretrained(folder / name)
        tok.save_pretrained(folder / name)
    rows = []
    for i in range(40):
        q, a = QUESTIONS[i % 6], ANSWERS[i % 6]
        turns = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        if i % 3 == 0:
            turns += [{"role": "user", "content": QUESTIONS[(i + 1) % 6]},
                      {"role": "assistant", "content": ANSWERS[(i + 1) % 6]}]
        rows.append({"messages": turns, "id": i})
    (folder / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_chat_jsonl_with_a_pretrained_student(tmp_path, example):
    write_models_and_chats(tmp_path)
    r, rep = example("examples/chat_jsonl")
    assert r.exit_code == 0, r.output
    assert rep["data"]["format"] == "chat" and rep["student"]["steps"] == 18  # 36 conversations, batch 4, 2 epochs
    assert rep["student"]["params"] < rep["teacher"]["params"]
    for who in ("teacher", "student", "baseline"):
        assert math.isfinite(rep[who]["metrics"]["perplexity"])
    assert rep["generations"][0]["prompt"].endswith("<s>assistant\n")  # a chat prompt, ready for the reply
    ev = example.cli("eval", "run")
    assert ev.exit_code == 0, ev.output
    assert json.loads(ev.stdout)["metrics"]["perplexity"] == pytest.approx(rep["student"]["metrics"]["perplexity"])


def test_only_assistant_tokens_count_and_bad_rows_are_named():
    from kdistill.data.lm import chat_tensors, check_conversation
    from kdistill.errors import KDistillError
    from kdistill.teachers.tiny import train_tokenizer

    tok = train_tokenizer(QUESTIONS + ANSWERS, vocab_size=300)
    conv = [{"role": "user", "content": QUESTIONS[0]}, {"role": "assistant", "content": ANSWERS[0]}]
    t = chat_tensors(tok, [conv], max_length=64)
    trained = tok.decode(t["labels"][0][t["mask"][0]])
    assert trained.startswith(ANSWERS[0]) and QUESTIONS[0] not in trained and "</s>" in trained
    with pytest.raises(KDistillError, match="no assistant turn"):
        check_conversation([{"role": "user", "content": "hi"}], "data, row 7")
    with pytest.raises(KDistillError, match="turn 1"):
        check_conversation([{"role": "user"}], "data, row 3")
    with pytest.raises(KDistillError, match="nothing of the assistant's reply fits"):
        chat_tensors(tok, [conv], max_length=4)
