import json

import pytest
import torch

from kdistill.config import load_config
from kdistill.data.pairs import load_pairs
from kdistill.errors import ConfigError
from kdistill.exporters.sentence_transformers import load_student
from kdistill.tasks.embedding import EmbeddingDataSpec

TINY = {
    "task": "embedding", "name": "tiny_embedding", "teacher": "tiny",
    "student": {"name": "layer_subset", "kwargs": {"layers": [0, 3]}},
    "data": {"name": "tiny", "num_eval": 60, "num_dev": 30, "num_train": 200, "max_length": 24},
    "method": {"name": "embedding_kd", "kwargs": {"cosine_weight": 1.0, "listwise_weight": 0.1}},
    "train": {"epochs": 1, "max_steps": 4, "batch_size": 32, "lr": 1e-4, "log_every": 1},
    "eval": {"throughput_sentences": 32, "throughput_repeats": 1, "batch_size": 32},
}


def test_embedding_recipes_validate():
    for name in ("embedding/minilm_to_2layer", "embedding/minilm_to_static"):
        cfg = load_config(name)
        assert cfg.task == "embedding" and cfg.teacher == "minilm-l6" and cfg.data.num_eval == 2000


def test_bad_student_kwargs_fail_at_load_time():
    bad = {**TINY, "student": {"name": "layer_subset", "kwargs": {"layer": [0]}}}
    with pytest.raises(ConfigError, match="layers"):
        load_config(bad)
    with pytest.raises(ConfigError, match="corpus"):
        load_config({**TINY, "student": {"name": "static", "kwargs": {"corpus": ["x"]}}})


def test_split_is_held_out_from_training():
    spec = EmbeddingDataSpec(name="tiny", num_eval=60, num_dev=30, num_train=None)
    sentences, dev, test = load_pairs(**spec.load_kwargs())
    held = {p.query.lower() for p in test + dev} | {p.candidate.lower() for p in test + dev}
    assert not held & {s.lower() for s in sentences}
    assert len(test) == 60 and len(dev) == 30


@pytest.mark.resources
def test_synonym_queries_add_training_pairs_but_keep_the_held_out_split():
    base = EmbeddingDataSpec(name="wordnet", num_train=None, pairs=True)
    sentences, dev, test = load_pairs(**base.load_kwargs())
    more, dev2, test2 = load_pairs(**base.model_copy(update={"synonym_queries": True}).load_kwargs())
    assert test2 == test and dev2 == dev
    assert len(more) > len(sentences) + 150_000 and more[: len(sentences)] == sentences
    held_q = {p.query.lower() for p in test + dev}
    held_c = {p.candidate.lower() for p in test + dev}
    assert not any(q.lower() in held_q for q in more[0::2]) and not any(c.lower() in held_c for c in more[1::2])
    with pytest.raises(Exception, match="synonym_queries needs data.name 'wordnet'"):
        load_pairs(**EmbeddingDataSpec(name="tiny", num_eval=60, num_dev=30, synonym_queries=True).load_kwargs())


def test_tiny_run_writes_report_and_loadable_student(tmp_path):
    from kdistill.api import run

    report = run(TINY, output=tmp_path, progress=False, quiet=True)
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["task"] == "embedding" and on_disk["method"] == "embedding_kd"
    for who in ("teacher", "student"):
        m = on_disk[who]["metrics"]
        assert 0.0 <= m["recall_at_1"] <= m["recall_at_10"] <= 1.0 and 0.0 < m["mrr"] <= 1.0
        assert on_disk[who]["sentences_per_second"] > 0 and on_disk[who]["params"] > 0
    assert report["student"]["params"] < report["teacher"]["params"]
    assert -1.0 <= report["agreement"]["spearman_vs_teacher"] <= 1.0
    assert "untrained" in report["variants"] and report["export"]["st_max_abs_diff"] < 1e-5
    keys = ("student_queries_recall_at_1", "student_candidates_recall_at_1")
    mixed = [report["agreement"][k] for k in keys]
    assert all(0.0 <= x <= 1.0 for x in mixed) and mixed == [on_disk["student"]["metrics"][k] for k in keys]
    assert "student_queries_recall_at_1" not in on_disk["teacher"]["metrics"]
    assert "the student's queries against the teacher's index" in (tmp_path / "report.md").read_text()
    student = load_student(tmp_path / "student")
    assert student.encode(["light"]).shape == (1, 32)
    from kdistill.api import evaluate  # `kdistill eval` on an embedding run: the recipe's test pairs again

    ev = evaluate(tmp_path)
    assert ev["task"] == "embedding" and ev["test_pairs"] == 60
    assert ev["metrics"]["recall_at_1"] == pytest.approx(on_disk["student"]["metrics"]["recall_at_1"])


def test_no_progress_hides_the_hugging_face_loading_bars(tmp_path):
    import subprocess
    import sys

    import yaml

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(TINY))
    cmd = [sys.executable, "-m", "kdistill.cli", "run", str(recipe), "--output", str(tmp_path / "run")]
    quiet = subprocess.run(cmd + ["--no-progress"], capture_output=True, text=True, timeout=600)
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert "Loading weights" not in quiet.stderr + quiet.stdout
    shown = subprocess.run(cmd, capture_output=True, text=True, timeout=600)  # the bars this option hides
    assert shown.returncode == 0 and "Loading weights" in shown.stderr + shown.stdout


def test_static_least_squares_projection_moves_student_towards_teacher():

    from kdistill.students.encoders import tiny_corpus, tiny_encoder
    from kdistill.students.static import build_static

    teacher = tiny_encoder(num_layers=2, seed=0)
    corpus = tiny_corpus(200, seed=1)
    held = tiny_corpus(40, seed=2)
    target = teacher.encode(held)
    cos = {}
    for init in ("identity", "least_squares"):
        s = build_static(teacher, corpus=corpus, dim=8, projection=True, projection_init=init)
        cos[init] = float((s.encode(held) * target).sum(1).mean())
    assert cos["least_squares"] > cos["identity"] + 0.1
    with pytest.raises(Exception, match="projection_init"):
        build_static(teacher, corpus=corpus, dim=8, projection=True, projection_init="pca")


def test_quantize_stage_reports_pq_retrieval_and_saves_codebooks(tmp_path):
    from kdistill.api import run
    from kdistill.io import load_state_dict

    cfg = {**TINY, "quantize": {"num_subspaces": 8, "num_centroids": 16, "kmeans_iters": 5, "epochs": 2,
                                "batch_size": 64, "neighbours": 0, "max_train": 100},
           "export": {"sentence_transformers": False}}
    report = run(cfg, output=tmp_path, progress=False, quiet=True)
    q = report["quantization"]
    assert q["bytes_per_vector"] == 8 and q["dense_bytes_per_vector"] == 4 * 32 and q["compression"] == 16.0
    for key in ("dense", "kmeans", "distill_vq"):
        assert 0.0 <= q[key]["recall_at_1"] <= q[key]["recall_at_10"] <= 1.0
    # codebooks fitted on a 100-text subset of the 200 training texts: 2 epochs x ceil(100 / 64) steps
    assert q["train_texts"] == 100 and report["data"]["train_sentences"] == 200
    assert q["kmeans"]["reconstruction_mse"] > 0 and q["distill_vq_training"]["steps"] == 2 * 2
    assert q["dense"]["recall_at_1"] == pytest.approx(report["student"]["metrics"]["recall_at_1"])
    assert load_state_dict(tmp_path / "pq.safetensors")["codebooks"].shape == (8, 16, 4)
    assert "Product quantisation" in (tmp_path / "report.md").read_text()
    with pytest.raises(ConfigError, match="num_subspace"):
        load_config({**TINY, "quantize": {"num_subspace": 8}})


def test_pairs_mode_keeps_training_pairs_together_and_trains(tmp_path):
    from kdistill.api import run
    from kdistill.data.text import Pair

    spec = EmbeddingDataSpec(name="tiny", num_eval=60, num_dev=30, num_train=100, pairs=True)
    sentences, dev, test = load_pairs(**spec.load_kwargs())
    assert len(sentences) == 100
    plain = EmbeddingDataSpec(name="tiny", num_eval=60, num_dev=30, num_train=100)
    _, dev_plain, test_plain = load_pairs(**plain.load_kwargs())
    assert test == test_plain and dev == dev_plain  # same held-out split either way
    from kdistill.students.encoders import tiny_corpus

    # the interleaving is (query, its own candidate)

    all_pairs = {Pair(" ".join(s.split()[: max(1, len(s.split()) // 2)]), s) for s in tiny_corpus(600, seed=11)}
    assert all(Pair(q, c) in all_pairs for q, c in zip(sentences[0::2], sentences[1::2]))
    cfg = {**TINY, "data": {**TINY["data"], "pairs": True, "num_train": 128},
           "method": {"name": "embedding_kd", "kwargs": {"cosine_weight": 1.0, "margin_weight": 1.0,
                                                         "listwise_weight": 0.1}},
           "train": {**TINY["train"], "batch_size": 16}, "export": {"sentence_transformers": False}}
    report = run(cfg, output=tmp_path, progress=False, quiet=True)
    assert report["data"]["train_sentences"] == 128
    assert 0.0 <= report["student"]["metrics"]["recall_at_1"] <= 1.0


def test_neighbour_batches_group_teacher_neighbours_and_train(tmp_path, monkeypatch):
    import torch

    from kdistill.api import run
    from kdistill.data import NeighbourGroupSampler
    from kdistill.tasks import embedding as emb

    seen = {}

    def spy(neighbours, group, seed):
        seen["shape"], seen["group"] = tuple(neighbours.shape), group
        return NeighbourGroupSampler(neighbours, group, seed)

    monkeypatch.setattr(emb, "NeighbourGroupSampler", spy)
    cfg = {**TINY, "data": {**TINY["data"], "pairs": True, "num_train": 128, "neighbour_group": 4,
                            "neighbour_pool": 6},
           "train": {**TINY["train"], "batch_size": 16}, "export": {"sentence_transformers": False}}
    report = run(cfg, output=tmp_path, progress=False, quiet=True)
    assert seen == {"shape": (64, 6), "group": 4}  # one row per pair, pool of 6 neighbours
    assert 0.0 <= report["student"]["metrics"]["recall_at_1"] <= 1.0
    # pairs are keyed by the sum of their two unit vectors: a pair's nearest row is the one with the same vectors
    t = torch.randn(5, 2, 8)
    t[3] = t[1] * 2.0
    from kdistill.data.pairs import row_neighbours

    assert row_neighbours(t, 2)[1, 0] == 3
    with pytest.raises(ConfigError, match="neighbour_group"):
        load_config({**TINY, "data": {**TINY["data"], "neighbour_group": 0}})


def test_bad_quantize_settings_fail_at_load_time():
    for bad, word in (({"neighbours": 300}, "neighbours"), ({"num_centroids": 1}, "num_centroids"),
                      ({"lr": 0.0}, "lr"), ({"max_train": 100}, "max_train")):
        with pytest.raises(ConfigError, match=word):
            load_config({**TINY, "quantize": bad})


def test_quantize_width_mismatch_fails_before_training(tmp_path):
    from kdistill.api import run
    from kdistill.errors import KDistillError

    with pytest.raises(KDistillError, match="divisor of the embedding width 32"):
        run({**TINY, "quantize": {"num_subspaces": 5}}, output=tmp_path, progress=False, quiet=True)
    assert not (tmp_path / "work").exists()  # nothing was trained


def test_token_term_runs_teacher_live_and_trains_both_layouts(tmp_path, monkeypatch):
    from kdistill.api import run
    from kdistill.students import encoders as emb

    calls = {"n": 0, "shapes": []}
    real = emb.token_forward

    def spy(model, batch):
        out = real(model, batch)
        calls["n"] += 1
        calls["shapes"].append(tuple(out.features["tokens"].shape))
        return out

    monkeypatch.setattr(emb, "token_forward", spy)
    kwargs = {"cosine_weight": 1.0, "listwise_weight": 0.1, "token_weight": 1.0}
    for pairs in (False, True):
        calls.update(n=0, shapes=[])
        cfg = {**TINY, "data": {**TINY["data"], "pairs": pairs, "num_train": 64},
               "method": {"name": "embedding_kd", "kwargs": kwargs},
               "train": {**TINY["train"], "batch_size": 8}, "export": {"sentence_transformers": False}}
        report = run(cfg, output=tmp_path / str(pairs), progress=False, quiet=True)
        # probe (student + teacher) and 4 steps (student + teacher each): student and teacher see the same tokens
        assert calls["n"] == 10 and calls["shapes"][0] == calls["shapes"][1]
        assert calls["shapes"][0][0] == (16 if pairs else 8)  # a batch of 8 pairs is 16 texts
        log = [json.loads(x) for x in (tmp_path / str(pairs) / "work" / "metrics.jsonl").read_text().splitlines()]
        tok = [h["tokens"] for h in log if "tokens" in h]
        assert len(tok) == 4 and all(0.0 < v < 2.0 for v in tok)
        assert 0.0 <= report["student"]["metrics"]["recall_at_1"] <= 1.0


def test_token_term_needs_a_transformer_student():
    with pytest.raises(ConfigError, match="token_weight"):
        load_config({**TINY, "student": {"name": "static", "kwargs": {"dim": 16}},
                     "method": {"name": "embedding_kd", "kwargs": {"cosine_weight": 1.0, "token_weight": 1.0}}})


def test_pair_term_trains_on_pairs_and_needs_them(tmp_path):
    from kdistill.api import run

    kwargs = {"cosine_weight": 1.0, "pair_weight": 0.5}
    with pytest.raises(ConfigError, match="data.pairs"):
        load_config({**TINY, "method": {"name": "embedding_kd", "kwargs": kwargs}})
    cfg = {**TINY, "data": {**TINY["data"], "pairs": True}, "method": {"name": "embedding_kd", "kwargs": kwargs},
           "train": {**TINY["train"], "batch_size": 8}, "export": {"sentence_transformers": False}}
    report = run(cfg, output=tmp_path, progress=False, quiet=True)
    log = [json.loads(x) for x in (tmp_path / "work" / "metrics.jsonl").read_text().splitlines()]
    pairs = [h["pairs"] for h in log if "pairs" in h]
    # 8 pairs per batch: a random student scores about 0.5 * log(8); the term is logged at every step
    assert len(pairs) == 4 and all(0.0 < v < 0.5 * 2 * torch.log(torch.tensor(8.0)) for v in pairs)
    assert 0.0 <= report["student"]["metrics"]["recall_at_1"] <= 1.0


@pytest.mark.gpu
def test_tiny_embedding_run_on_cuda(tmp_path):
    from kdistill.api import run

    report = run(TINY, output=tmp_path, progress=False, quiet=True)
    assert 0.0 <= report["student"]["metrics"]["recall_at_1"] <= 1.0
