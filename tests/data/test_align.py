"""Cross-tokenizer alignment: groups on hand-made tokenisations, blocks covering the same text on both sides,
the vocabulary map, and held-out character counts."""

from __future__ import annotations

import pytest
import torch

from kdistill.data.align import align_spans, char_text_blocks, check_cross_data, cross_blocks, token_ends, vocab_map
from kdistill.data.lm import text_blocks
from kdistill.errors import KDistillError
from kdistill.teachers.tiny import train_tokenizer

TEXTS = ["In the beginning God created the heaven and the earth.",
         "And the earth was without form, and void; and darkness was upon the face of the deep.",
         "And God said, Let there be light: and there was light.",
         "And God saw the light, that it was good: and God divided the light from the darkness."] * 6


@pytest.fixture(scope="module")
def toks():
    return train_tokenizer(TEXTS, vocab_size=300), train_tokenizer(TEXTS, vocab_size=360)


def test_groups_of_a_hand_made_pair_exact_merged_and_tail():
    # "abcdefgh": student ab | c | def | gh ; teacher ab | cd | ef | g | h
    student_ends, teacher_ends = [2, 3, 6, 8], [2, 4, 6, 7, 8]
    assert align_spans(student_ends, teacher_ends) == [
        (0, 1, 0, 1),   # "ab": one token each, the same span -> exact
        (1, 3, 1, 3),   # "cdef": c+def vs cd+ef -> merged
        (3, 4, 3, 5),   # "gh": one student token for two teacher tokens -> merged
    ]
    # tokens after the last shared end belong to no group
    assert align_spans([2, 5], [2, 4]) == [(0, 1, 0, 1)]
    # an empty-span token (a multi-byte character cut into byte tokens) joins the group after it
    assert align_spans([1, 1, 3], [1, 3]) == [(0, 1, 0, 1), (1, 3, 1, 2)]


def test_token_ends_tile_the_text(toks):
    t, _ = toks
    ids, ends = token_ends(t, TEXTS[1])
    assert len(ids) == len(ends) and ends[-1] == len(TEXTS[1]) and ends == sorted(ends)
    pieces = [TEXTS[1][a:b] for a, b in zip([0, *ends[:-1]], ends)]
    assert "".join(pieces) == TEXTS[1] and pieces == [t.decode([i]) for i in ids]


def test_blocks_cover_the_same_text_on_both_sides(toks):
    s, t = toks
    b = cross_blocks(s, t, TEXTS, block_length=24, max_blocks=6)
    assert b["input_ids"].shape == b["teacher_input_ids"].shape == (6, 24)
    text = ""
    for r in range(6):
        ns, nt = int(b["attention_mask"][r].sum()), int(b["teacher_attention_mask"][r].sum())
        assert 2 <= ns <= 24 and 2 <= nt <= 24 and max(ns, nt) >= 20  # cut near the limit of the longer side
        s_text = s.decode(b["input_ids"][r, :ns])
        assert s_text == t.decode(b["teacher_input_ids"][r, :nt])
        text += s_text
        # labels: next student token; teacher_mask: positions with a next teacher token
        assert b["labels"][r, :ns - 1].tolist() == b["input_ids"][r, 1:ns].tolist()
        assert not b["mask"][r, ns - 1:].any() and b["teacher_mask"][r].sum() == nt - 1
    assert text == "</s>".join(TEXTS)[:len(text)]  # consecutive blocks, nothing skipped
    # every group's first token is predicted by the paired positions, which read the same text
    r = 0
    for g in range(24):
        i, j = int(b["group_student_start"][r, g]), int(b["group_teacher_start"][r, g])
        if i < 0:
            assert j < 0
            continue
        assert s.decode(b["input_ids"][r, :i + 1]) == t.decode(b["teacher_input_ids"][r, :j + 1])
        s_pos = (b["student_group"][r] == g).nonzero().flatten().tolist()
        t_pos = (b["teacher_group"][r] == g).nonzero().flatten().tolist()
        assert s_pos[0] == i and t_pos[0] == j
        span = s.decode(b["input_ids"][r, i + 1:s_pos[-1] + 2])
        assert span == t.decode(b["teacher_input_ids"][r, j + 1:t_pos[-1] + 2])
        assert bool(b["group_exact"][r, g]) == (len(s_pos) == len(t_pos) == 1)
    assert b["group_exact"].any() and ((b["group_student_start"] >= 0) & ~b["group_exact"]).any()


def test_same_tokenizer_gives_only_exact_groups(toks):
    t, _ = toks
    b = cross_blocks(t, t, TEXTS, block_length=16, max_blocks=3)
    present = b["group_student_start"] >= 0
    assert torch.equal(b["input_ids"], b["teacher_input_ids"]) and bool(b["group_exact"][present].all())
    assert int(present.sum()) == int(b["mask"].sum())  # every predicted token is its own group


def test_errors_say_what_to_change(toks):
    s, t = toks
    with pytest.raises(KDistillError, match="fewer than block_length"):
        cross_blocks(s, t, ["tiny"], block_length=32, max_blocks=2)
    with pytest.raises(KDistillError, match="data.stream, cache"):
        check_cross_data(layout="text", stream=True, cache=True, sequence_kd=False, prompt_tokens=0)
    with pytest.raises(KDistillError, match="data.prompt_tokens on text blocks"):
        check_cross_data(layout="text", stream=False, cache=False, sequence_kd=False, prompt_tokens=8)
    check_cross_data(layout="text", stream=False, cache=False, sequence_kd=False, prompt_tokens=0)
    check_cross_data(layout="chat", stream=False, cache=False, sequence_kd=False, prompt_tokens=0)
    check_cross_data(layout="prompts", stream=False, cache=False, sequence_kd=False, prompt_tokens=8)


def test_vocab_map_pairs_equal_strings(toks):
    s, t = toks
    si, ti = vocab_map(s, t)
    assert si.shape == ti.shape and len(si) > 100
    pairs = dict(zip(si.tolist(), ti.tolist()))
    assert pairs[s.eos_token_id] == t.eos_token_id
    for a, b in list(pairs.items())[1:40]:
        assert s.decode([a]) == t.decode([b])
    word = " the"
    a, b = s(word, add_special_tokens=False)["input_ids"], t(word, add_special_tokens=False)["input_ids"]
    if len(a) == len(b) == 1:
        assert pairs[a[0]] == b[0]


def test_char_blocks_are_the_text_blocks_with_character_counts(toks):
    t, _ = toks
    held = char_text_blocks(t, TEXTS, block_length=16, tokens=64)
    assert torch.equal(held["input_ids"], text_blocks(t, TEXTS, block_length=16, tokens=64))
    row, chars = held["input_ids"][0], held["target_chars"][0]
    assert chars[-1] == 0 and all(int(c) == (1 if int(i) == t.eos_token_id else len(t.decode([int(i)])))
                                  for i, c in zip(row[1:], chars[:-1]))


def test_prompt_rows_align_the_reply_after_each_sides_own_context(toks):
    from kdistill.data.align import cross_rows, shift_positions, side_of

    s, t = toks
    prompts = [("In the beginning", " God created the heaven and the earth."),
               ("And God said,", " Let there be light: and there was light.")]
    r = cross_rows(s, t, prompts, layout="prompts", block_length=40, prompt_tokens=12)
    assert r["input_ids"].shape == r["teacher_input_ids"].shape == (2, 40)
    for i, (prompt, reply) in enumerate(prompts):
        cs, ct = (len(x(prompt, add_special_tokens=False)["input_ids"]) for x in (s, t))
        assert int(r["teacher_offset"][i]) == ct - cs
        for tok, side, c in ((s, "student", cs), (t, "teacher", ct)):
            v = side_of(r, side)
            trained = v["labels"][i][v["mask"][i]]
            assert tok.decode(trained) == reply + tok.eos_token  # the reply and its EOS, never the prompt
            assert v["mask"][i].nonzero().flatten().tolist() == list(range(c - 1, c - 1 + len(trained)))
            assert int(v["target_chars"][i].sum()) == len(reply) + 1  # EOS = one character on both sides
        # groups tile the reply: the first is predicted by each side's last prompt token
        assert int(r["group_student_start"][i, 0]) == cs - 1 and int(r["group_teacher_start"][i, 0]) == ct - 1
        n = int((r["group_student_start"][i] >= 0).sum())
        assert int(r["student_group"][i].max()) == int(r["teacher_group"][i].max()) == n - 1
    # shifting the teacher by teacher_offset puts its i-th reply position under the student's
    shifted, valid = shift_positions(r["teacher_mask"], r["teacher_offset"])
    both = shifted & valid & r["mask"]
    n_s, n_t = r["mask"].sum(1), r["teacher_mask"].sum(1)
    assert both.sum(1).tolist() == torch.minimum(n_s, n_t).tolist()
    first = r["mask"].float().argmax(1)
    assert all(bool(shifted[i, first[i]]) for i in range(2))


def test_chat_rows_one_per_assistant_turn_and_errors(toks):
    from kdistill.data.align import cross_rows

    s, t = toks
    chat = [[{"role": "user", "content": "In the beginning"},
             {"role": "assistant", "content": "God created the heaven."},
             {"role": "user", "content": "And then?"},
             {"role": "assistant", "content": "And the earth."}]]
    r = cross_rows(s, t, chat, layout="chat", block_length=128)
    assert r["input_ids"].shape[0] == 2  # one row per assistant turn, the turns before it as its context
    for i, reply in enumerate(("God created the heaven.", "And the earth.")):
        assert s.decode(r["labels"][i][r["mask"][i]]) == reply + s.eos_token
        ctx = s.apply_chat_template(chat[0][: 2 * i + 1], tokenize=False, add_generation_prompt=True)
        n = int(r["mask"][i].float().argmax()) + 1
        assert s.decode(r["input_ids"][i, :n]) == ctx  # the student's own chat template
    # a reply cut where both tokenisations end a token, within block_length on each side
    cut = cross_rows(s, t, [("In", " the beginning God created the heaven and the earth.")], layout="prompts",
                     block_length=8, prompt_tokens=4)
    ns, nt = int(cut["mask"].sum()), int(cut["teacher_mask"].sum())
    assert 1 <= ns and 1 <= nt and s.decode(cut["labels"][0][cut["mask"][0]]) == t.decode(
        cut["teacher_labels"][0][cut["teacher_mask"][0]])
    with pytest.raises(KDistillError, match=r"row 1 \(student\): the context has \d+ tokens, expected 1 to 2"):
        cross_rows(s, t, [("In the beginning God created", "x")], layout="prompts", block_length=16, prompt_tokens=2)
    full = max(len(x("In the", add_special_tokens=False)["input_ids"]) for x in (s, t))
    with pytest.raises(KDistillError, match="nothing of the reply fits"):  # the context fills the row on one side
        cross_rows(s, t, [("In the", " beginning")], layout="prompts", block_length=full, prompt_tokens=full)
