"""``minilm``: layer discovery, relation terms, hidden-state transfer, and 3-step runs on tiny BERT and Llama."""

import pytest
import torch

from kdistill.capture import attention_layers
from kdistill.config import load_config
from kdistill.data.loaders import TensorDictDataset, make_loader
from kdistill.errors import KDistillError
from kdistill.methods.minilm import MiniLM
from kdistill.registry import METHODS
from kdistill.students.encoders import layer_subset, tiny_corpus, tiny_encoder, training_forwards
from kdistill.train.loop import fit, make_accelerator


def _llama(layers=2, hidden=32, heads=4, kv_heads=4, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def _logged_terms(out_dir) -> set:
    import json

    rows = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {k for r in rows for k in r}


def _encoder_run(method, teacher, student, steps=3, out_dir=None):
    texts = tiny_corpus(48, seed=1)
    enc = teacher.tokenize(texts, max_length=16)
    with torch.no_grad():
        emb = teacher(**enc)
    fwd, tkw = training_forwards(teacher, list(enc), token_states=True)
    loader = make_loader(TensorDictDataset(**enc, teacher_emb=emb), 16, seed=0)
    return fit(student=student, method=method, train_loader=loader, accelerator=make_accelerator(),
               student_forward=fwd, **tkw, max_steps=steps, epochs=1, progress=False, log_every=1, lr=1e-3,
               output_dir=out_dir)


def _lm_run(method, teacher, student, steps=3, out_dir=None):
    from kdistill.teachers.lm import lm_logits

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 64, (24, 12), generator=g)
    attn = torch.ones_like(ids)
    attn[::3, 9:] = 0  # some right padding
    mask = attn[:, 1:].bool()
    labels = ids[:, 1:].masked_fill(~mask, -100)
    data = TensorDictDataset(input_ids=ids, attention_mask=attn, labels=torch.cat([labels, labels[:, :1] * 0 - 100], 1),
                             mask=torch.cat([mask, torch.zeros(24, 1, dtype=torch.bool)], 1))
    loader = make_loader(data, 8, seed=0)
    return fit(student=student, method=method, teacher=teacher, train_loader=loader, accelerator=make_accelerator(),
               student_forward=lm_logits, teacher_forward=lm_logits, max_steps=steps, epochs=1, progress=False,
               log_every=1, lr=1e-3, output_dir=out_dir)


def test_registered_not_cacheable():
    assert METHODS.get("minilm") is MiniLM and not MiniLM.cacheable and MiniLM.needs_teacher


def test_attention_layers_of_bert_and_llama():
    enc = attention_layers(tiny_encoder(num_layers=3, hidden_size=32, num_heads=4))
    assert [x.q for x in enc] == [f"backbone.encoder.layer.{i}.attention.self.query" for i in range(3)]
    assert enc[-1].block == "backbone.encoder.layer.2" and enc[-1].head_dim == 8
    lm = attention_layers(_llama(kv_heads=2))
    assert [x.k for x in lm] == ["model.layers.0.self_attn.k_proj", "model.layers.1.self_attn.k_proj"]
    assert lm[0].block == "model.layers.0" and lm[0].head_dim == 8


def test_resolve_layers_picks_by_index_or_name_and_sets_causal():
    teacher, student = _llama(layers=3, seed=0), _llama(layers=2, seed=1)
    m = MiniLM(teacher_layer=1, hidden_weight=1.0)
    m.resolve_layers(student, teacher)
    assert m.causal is True
    assert "model.layers.1.self_attn.q_proj" in m.teacher_layers
    assert "model.layers.1.self_attn.v_proj" in m.student_layers  # student default: the last
    assert m._pairs == (("model.layers.0", "model.layers.1"), ("model.layers.1", "model.layers.2"))  # auto: uniform
    m = MiniLM(teacher_layer="model.layers.0.self_attn", relations=["attention"], causal=False)
    m.resolve_layers(student, teacher)
    assert m.teacher_layers == ("model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.q_proj")
    assert m.causal is False
    with pytest.raises(KDistillError, match=r"expected an index in \[-3, 2\]"):
        MiniLM(teacher_layer=5).resolve_layers(student, teacher)
    with pytest.raises(KDistillError, match="Did you mean"):
        MiniLM(teacher_layer="model.layers.1.self_atn").resolve_layers(student, teacher)
    with pytest.raises(KDistillError, match="no self-attention layer"):
        MiniLM().resolve_layers(torch.nn.Linear(3, 3), teacher)
    with pytest.raises(KDistillError, match="live teacher"):
        MiniLM().resolve_layers(student, None)
    with pytest.raises(KDistillError, match="student indices in"):
        MiniLM(hidden_weight=1.0, hidden_pairs=[[0, 1], [2, 0]]).resolve_layers(student, teacher)


def test_bad_kwargs_fail_with_the_fix():
    with pytest.raises(KDistillError, match="Did you mean 'qq'"):
        MiniLM(relations=["qqq"])
    with pytest.raises(KDistillError, match="relation_heads applies to qq"):
        MiniLM(relations=["attention", "value"], relation_heads=4)
    with pytest.raises(KDistillError, match="hidden_weight > 0"):
        MiniLM(hidden_pairs=[[0, 1]])
    with pytest.raises(KDistillError, match="at least one term"):
        MiniLM(weight=0.0)
    with pytest.raises(KDistillError, match="name: METHOD"):
        MiniLM(output_method={"method": "llm_kd"})
    with pytest.raises(KDistillError, match="kwargs"):
        MiniLM(output_method={"name": "llm_kd", "kwargs": {"alpah": 0.5}})
    with pytest.raises(KDistillError, match="relations"):
        MiniLM(relations="qq")


def test_zero_when_the_student_is_the_teacher_and_positive_otherwise():
    from kdistill.methods.base import ModelOutput

    teacher = tiny_encoder(num_layers=2, hidden_size=32, num_heads=4)
    m = MiniLM(relations=["qq", "kk", "vv", "attention", "value"], relation_heads=2, hidden_weight=1.0)
    m.resolve_layers(teacher, teacher)
    from kdistill.capture import capture
    from kdistill.students.encoders import token_forward

    enc = teacher.tokenize(tiny_corpus(6, seed=3), max_length=12)

    def run(model):
        with capture(model, m.student_layers) as feats:
            out = token_forward(model, enc)
        out.features.update(feats)
        return out

    with torch.no_grad():
        s = run(teacher)
    t = ModelOutput(s.logits, {k: v.detach() for k, v in s.features.items()}, s.extra)
    terms = m(s, t, {})
    assert set(terms) == {"qq", "kk", "vv", "attention", "value", "hidden"}
    assert all(abs(float(v)) < 1e-6 for v in terms.values())
    with torch.no_grad():
        other = run(tiny_encoder(num_layers=2, hidden_size=32, num_heads=4, seed=1))  # random BERT: near-uniform
    assert all(float(v) > 1e-5 for v in m(other, t, {}).values())


def test_three_steps_on_sentence_encoders_train_student_and_projectors(tmp_path):
    teacher = tiny_encoder(num_layers=4, hidden_size=32, num_heads=4)
    student = tiny_encoder(num_layers=2, hidden_size=16, num_heads=2, seed=1, tokenizer=teacher.tokenizer)
    s0 = {k: v.clone() for k, v in student.state_dict().items()}
    t0 = {k: v.clone() for k, v in teacher.state_dict().items()}
    method = MiniLM(relation_heads=4, hidden_weight=1.0, hidden_loss="mse",
                    output_method={"name": "embedding_kd", "kwargs": {"mse_weight": 0.0, "cosine_weight": 1.0}})
    snap, setup = {}, method.setup

    def sized(info):  # the projectors' initial weights, right after setup() created them
        setup(info)
        snap.update({k: v.clone() for k, v in method.projectors.state_dict().items()})

    method.setup = sized
    res = _encoder_run(method, teacher, student, out_dir=tmp_path)
    assert res.steps == 3 and {"qq", "kk", "vv", "hidden", "cosine"} <= _logged_terms(tmp_path)
    changed = [k for k, v in res.student.state_dict().items() if not torch.equal(v, s0[k])]
    assert any("layer.1.attention.self.query" in k for k in changed)
    assert all(torch.equal(v, t0[k]) for k, v in teacher.state_dict().items())
    assert len(method.projectors) == 2 and method.output_method.projector is not None
    assert snap and all(not torch.equal(v, snap[k]) for k, v in method.projectors.state_dict().items())


def test_minilm_v1_needs_equal_head_counts_and_relation_heads_must_divide(tmp_path):
    teacher = tiny_encoder(num_layers=2, hidden_size=32, num_heads=4)
    student = layer_subset(teacher, [1])
    _encoder_run(MiniLM(relations=["attention", "value"]), teacher, student, steps=1, out_dir=tmp_path)
    assert {"attention", "value"} <= _logged_terms(tmp_path)
    narrow = tiny_encoder(num_layers=1, hidden_size=16, num_heads=2, seed=1, tokenizer=teacher.tokenizer)
    with pytest.raises(KDistillError, match="2 attention heads and the teacher 4"):
        _encoder_run(MiniLM(relations=["attention", "value"]), teacher, narrow, steps=1)
    with pytest.raises(KDistillError, match="relation_heads to a divisor of 16"):
        _encoder_run(MiniLM(relation_heads=3), teacher, narrow, steps=1)


def test_three_steps_on_a_grouped_query_llama_with_llm_kd_on_the_logits(tmp_path):
    teacher = _llama(layers=3, hidden=32, heads=4, kv_heads=2, seed=0)
    student = _llama(layers=2, hidden=16, heads=2, kv_heads=1, seed=1)
    method = MiniLM(relation_heads=2, hidden_weight=0.5, output_method={"name": "llm_kd", "kwargs": {"alpha": 0.5}})
    s0 = {k: v.clone() for k, v in student.state_dict().items()}
    res = _lm_run(method, teacher, student, out_dir=tmp_path)
    assert res.steps == 3 and {"qq", "kk", "vv", "hidden", "kd", "ce"} <= _logged_terms(tmp_path) and method.causal
    assert not torch.equal(res.student.state_dict()["model.layers.1.self_attn.k_proj.weight"],
                           s0["model.layers.1.self_attn.k_proj.weight"])


def _recipe(name: str) -> dict:
    import yaml

    from kdistill.recipes import find_recipe

    return yaml.safe_load(find_recipe(name).read_text())


def test_recipes_validate_and_the_task_runners_never_see_the_name():
    for name in ("embedding/minilm_relations_2layer", "llm/smollm2_minilm"):
        cfg = load_config(name)
        assert cfg.method.name == "minilm" and cfg.method.kwargs["output_method"]["name"] in ("embedding_kd", "llm_kd")
    with pytest.raises(KDistillError, match="not cacheable"):
        load_config("llm/smollm2_minilm", ["cache={dir: /tmp/x, k: 8}"])


def test_embedding_recipe_runs_on_tiny_models(tmp_path):
    from kdistill.api import run

    r = _recipe("embedding/minilm_relations_2layer")
    r.update(teacher="tiny", student={"name": "layer_subset", "kwargs": {"layers": [0, 3]}},
             data={"name": "tiny", "num_eval": 40, "num_dev": 20, "num_train": 96, "max_length": 16, "pairs": True},
             train={"epochs": 1, "max_steps": 2, "batch_size": 16, "lr": 1e-4, "log_every": 1},
             eval={"throughput_sentences": 16, "throughput_repeats": 1, "batch_size": 16, "eval_untrained": False})
    r["method"]["kwargs"].update(relation_heads=2)
    r["method"]["kwargs"]["output_method"]["kwargs"]["cross_queue"] = 32
    report = run(r, output=tmp_path, progress=False, quiet=True)
    assert report["method"] == "minilm" and 0.0 <= report["student"]["metrics"]["recall_at_1"] <= 1.0
    assert {"qq", "kk", "vv", "cosine", "pairs"} <= _logged_terms(tmp_path / "work")


def test_llm_task_runs_minilm_with_llm_kd_on_the_tiny_recipe(tmp_path):
    from kdistill import api

    method = ("method={name: minilm, kwargs: {relation_heads: 4, teacher_layer: 2, hidden_weight: 1.0, "
              "output_method: {name: llm_kd, kwargs: {alpha: 0.5}}}}")
    r = api.run("llm/tiny", output=tmp_path / "run", progress=False, quiet=True,
                overrides=[method, "baseline=false", "eval.generations=0"])
    assert r["method"] == "minilm" and r["student"]["metrics"]["perplexity"] > 0
    assert {"qq", "kk", "vv", "hidden", "kd", "ce"} <= _logged_terms(tmp_path / "run" / "work" / "student")
