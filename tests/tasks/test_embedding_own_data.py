"""Your own embedding data: (query, positive, negative) triples and unlabelled texts (kdistill.data.pairs), the
held-out measures they get (kdistill.eval.retrieval) and how embedding_kd reads hard negatives."""

import json

import pytest
import torch
import torch.nn.functional as F

from kdistill.config import load_config
from kdistill.data.pairs import load_embedding_data
from kdistill.errors import ConfigError, KDistillError
from kdistill.eval.retrieval import neighbour_agreement, retrieval_metrics, text_agreement
from kdistill.methods.base import ModelOutput
from kdistill.methods.embedding_kd import EmbeddingKD

BASE = {"task": "embedding", "teacher": "tiny", "student": {"name": "layer_subset", "kwargs": {"layers": [0, 3]}}}


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _triples(n=30):
    return [{"q": f"query {i}", "p": f"answer {i}", "n": f"wrong {i % 7}"} for i in range(n)]


def test_triples_stay_together_and_negatives_join_the_held_out_pool(tmp_path):
    rows = _triples() + [{"q": "query x", "p": "answer x", "n": "answer 3"}]  # a negative that is a positive
    test = rows[25:28] + rows[30:] + [{"q": "query y", "p": "answer 3", "n": "wrong 1"}]
    files = {"train": _jsonl(tmp_path / "train.jsonl", rows[:20]),
             "validation": _jsonl(tmp_path / "dev.jsonl", rows[20:25]), "test": _jsonl(tmp_path / "test.jsonl", test)}
    d = load_embedding_data(name="files", files=files, query_column="q", positive_column="p", negative_column="n")
    assert d.group_size == 3 and d.labelled
    assert d.train[:6] == ["query 0", "answer 0", "wrong 0", "query 1", "answer 1", "wrong 1"]
    assert len(d.train) == 3 * 20 and len(d.dev) == 5 and len(d.test) == 5
    # distinct negatives, none that is also a held-out positive ("answer 3" would tie with its partner)
    assert d.test_negatives == ["wrong 4", "wrong 5", "wrong 6", "wrong 1"]
    capped = load_embedding_data(name="files", files=files, query_column="q", positive_column="p",
                                 negative_column="n", num_train=31)
    assert len(capped.train) == 30  # whole triples: 31 // 3 = 10 of them


@pytest.mark.parametrize("bad, shown", [("", "''"), ("   ", "'   '"), (None, "None"), (3, "3 (int)"),
                                        (["a", "b"], "['a', 'b'] (list)")])
def test_a_bad_negative_names_split_row_and_column(tmp_path, bad, shown):
    rows = _triples()
    rows[4]["n"] = bad
    with pytest.raises(KDistillError) as e:
        load_embedding_data(name="files", files={"train": _jsonl(tmp_path / "t.jsonl", rows),
                                                 "validation": _jsonl(tmp_path / "v.jsonl", _triples(3)),
                                                 "test": _jsonl(tmp_path / "x.jsonl", _triples(3))},
                            query_column="q", positive_column="p", negative_column="n")
    msg = str(e.value)
    assert "train split), row 5, column 'n'" in msg and shown in msg and "hard negative" in msg and "Fix" in msg


def test_a_negative_equal_to_its_positive_is_refused(tmp_path):
    rows = _triples()
    rows[2]["n"] = rows[2]["p"]
    with pytest.raises(KDistillError, match=r"row \d+: the negative .* equals the positive .*answer 2"):
        load_embedding_data(name="files", files=_jsonl(tmp_path / "t.jsonl", rows), query_column="q",
                            positive_column="p", negative_column="n", validation_fraction=0.2, test_fraction=0.2)


def test_texts_alone_give_held_out_texts_and_refuse_bad_rows(tmp_path):
    (tmp_path / "texts.txt").write_text("\n".join(f"text number {i}" for i in range(50)) + "\n")
    d = load_embedding_data(name="files", files=str(tmp_path / "texts.txt"), text_column="text",
                            validation_fraction=0.1, test_fraction=0.2, num_train=20)
    assert not d.labelled and d.group_size == 1 and not d.test and len(d.train) == 20
    assert len(d.test_texts) == 10 and len(d.dev_texts) == 5 and not set(d.test_texts) & set(d.dev_texts)
    with pytest.raises(KDistillError, match="row 2, column 'body'.*got 5 \\(int\\)"):
        load_embedding_data(name="files", files={"train": _jsonl(tmp_path / "a.jsonl", [{"body": "x"}, {"body": 5}]),
                                                 "validation": _jsonl(tmp_path / "b.jsonl", [{"body": "y"}] * 2),
                                                 "test": _jsonl(tmp_path / "c.jsonl", [{"body": "z"}] * 2)},
                            text_column="body")
    with pytest.raises(KDistillError, match="test split holds 1 distinct text"):
        load_embedding_data(name="files", files={"train": str(tmp_path / "texts.txt"),
                                                 "validation": str(tmp_path / "texts.txt"),
                                                 "test": _jsonl(tmp_path / "c.jsonl", [{"text": "z"}] * 2)},
                            text_column="text")
    with pytest.raises(KDistillError, match="Did you mean 'text'"):
        load_embedding_data(name="files", files=str(tmp_path / "texts.txt"), text_column="txt")


def test_config_refuses_what_the_layout_cannot_serve():
    texts = {"files": "texts.txt", "text_column": "text"}
    refused = "'embedding_kd' as configured trains on .* data.text_column .* drop the pair"
    with pytest.raises(ConfigError, match=refused):
        load_config({**BASE, "data": texts, "method": {"name": "embedding_kd",
                                                      "kwargs": {"cosine_weight": 1.0, "pair_weight": 0.5}}})
    with pytest.raises(ConfigError, match="data.text_column .* and data.query_column"):
        load_config({**BASE, "data": {**texts, "query_column": "q"}})
    with pytest.raises(ConfigError, match="pairs: true keeps .* but data.text_column"):
        load_config({**BASE, "data": {**texts, "pairs": True}})
    with pytest.raises(ConfigError, match="quantize measures retrieval on held-out pairs"):
        load_config({**BASE, "data": texts, "quantize": {"num_subspaces": 8}})
    with pytest.raises(ConfigError, match="negative_column reads your own files"):
        load_config({**BASE, "data": {"name": "tiny", "negative_column": "neg"}})
    # the pair term is served by triples without data.pairs (they are always kept together)
    cfg = load_config({**BASE, "data": {"files": "t.jsonl", "negative_column": "negative"},
                       "method": {"name": "embedding_kd", "kwargs": {"cosine_weight": 1.0, "pair_weight": 0.5}}})
    assert cfg.data.negative_column == "negative"


def test_distractors_join_the_candidate_pool():
    q = torch.eye(4)
    c = torch.eye(4) + 0.1
    assert retrieval_metrics(q, c)["recall_at_1"] == 1.0
    d = torch.eye(4)[:2] * 2.0  # exact matches of queries 0 and 1: ranked above their partners
    m = retrieval_metrics(q, c, distractors=d)
    assert m["recall_at_1"] == 0.5 and m["mrr"] == pytest.approx((0.5 + 0.5 + 1 + 1) / 4)
    with pytest.raises(KDistillError, match="distractor embeddings"):
        retrieval_metrics(q, c, distractors=torch.zeros(2, 3))


def test_neighbour_agreement_by_hand():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(30, 8, generator=g)
    rot = torch.linalg.qr(torch.randn(8, 8, generator=g)).Q
    assert neighbour_agreement(t @ rot, t, k=5) == pytest.approx(1.0)  # a rotation keeps every neighbour
    # 4 texts on a line: neighbours of 0 are {1}, of 1 {0 or 2}, ...; the student swaps texts 0 and 3
    t = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.1, 0.9], [0.0, 1.0]])
    s = t[[3, 1, 2, 0]]
    # k = 1: nearest of 0 under t is 1, under s is 2; of 1: t -> 0, s -> 2 (0 now far); of 2: t -> 3, s -> 1;
    # of 3: t -> 2, s -> 1 -> no agreement at all
    assert neighbour_agreement(s, t, k=1) == 0.0
    wide = text_agreement(torch.randn(30, 4, generator=g), torch.randn(30, 8, generator=g), k=50)
    assert wide["cosine_to_teacher"] is None and wide["neighbour_k"] == 29  # capped at n - 1
    assert 0.0 <= wide["neighbour_agreement"] <= 1.0 and -1.0 <= wide["spearman_vs_teacher"] <= 1.0


def _grouped(x, g):
    return ModelOutput(logits=x, extra={"group_size": g})


def test_margin_term_uses_each_querys_own_triple():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(9, 6, generator=g, requires_grad=True), torch.randn(9, 6, generator=g)
    m = EmbeddingKD(mse_weight=0, margin_weight=1.0)
    got = m(_grouped(s, 3), ModelOutput(logits=t), {})["margin"]
    plain = m(ModelOutput(logits=s), ModelOutput(logits=t), {})["margin"]  # no layout: in-batch margins only

    def cos(x, i, j):
        return F.cosine_similarity(x[i], x[j], dim=0)

    labelled = torch.stack([((cos(s, r, r + 1) - cos(s, r, r + 2)) - (cos(t, r, r + 1) - cos(t, r, r + 2))) ** 2
                            for r in (0, 3, 6)])
    # the six other rows keep the in-batch form: recover it from the plain run (rows not replaced)
    s_sim = F.normalize(s, dim=1) @ F.normalize(s, dim=1).T
    t_sim = F.normalize(t, dim=1) @ F.normalize(t, dim=1).T
    keep = ~torch.eye(9, dtype=torch.bool)
    s_off, t_off = s_sim[keep].view(9, 8), t_sim[keep].view(9, 8)
    order = torch.argsort(t_off, dim=1, descending=True)
    so, to = s_off.gather(1, order), t_off.gather(1, order)
    in_batch = ((so[:, :1] - so[:, 1:]) - (to[:, :1] - to[:, 1:])).pow(2).mean(1)
    assert torch.allclose(plain, in_batch.mean(), atol=1e-6)
    expected = in_batch.clone()
    expected[0::3] = labelled
    assert torch.allclose(got, expected.mean(), atol=1e-6)
    got.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_pair_term_ranks_positives_against_hard_negatives():
    from kdistill.losses.relations import contrastive_nce

    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(12, 6, generator=g), torch.randn(12, 6, generator=g)
    m = EmbeddingKD(mse_weight=0, pair_weight=1.0, kd_temperature=0.5)
    got = m(_grouped(s, 3), ModelOutput(logits=t), {})["pairs"]
    q, c, n = s[0::3], s[1::3], s[2::3]
    expected = 0.5 * (contrastive_nce(q, c, n, nce_temperature=0.5) + contrastive_nce(c, q, nce_temperature=0.5))
    assert torch.allclose(got, expected.mean(), atol=1e-6)
    # pairs (group 2) are unchanged by the layout key
    pairs = m(_grouped(s[:8], 2), ModelOutput(logits=t[:8]), {})["pairs"]
    assert torch.allclose(pairs, m(ModelOutput(logits=s[:8]), ModelOutput(logits=t[:8]), {})["pairs"])
    with pytest.raises(KDistillError, match="multiple of 3"):
        m(_grouped(s[:10], 3), ModelOutput(logits=t[:10]), {})
