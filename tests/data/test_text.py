import pytest

from kdistill.data.text import Pair, kjv_sentences, pair_texts, retrieval_split, wordnet_pairs


def test_retrieval_split_is_deterministic_distinct_and_leak_free():
    pairs = [Pair(f"q{i % 40}", f"c{i % 55}") for i in range(300)]
    train, held = retrieval_split(pairs, num_eval=20, seed=3)
    train2, held2 = retrieval_split(pairs, num_eval=20, seed=3)
    assert held == held2 and train == train2
    assert len({p.query for p in held}) == 20 and len({p.candidate for p in held}) == 20
    hq, hc = {p.query for p in held}, {p.candidate for p in held}
    assert all(p.query not in hq and p.candidate not in hc for p in train)
    assert retrieval_split(pairs, num_eval=20, seed=4)[1] != held
    with pytest.raises(ValueError, match="Lower num_eval"):
        retrieval_split(pairs, num_eval=41)


def test_pair_texts_unique_in_order():
    assert pair_texts([Pair("a", "b"), Pair("b", "c"), Pair("a", "d")]) == ["a", "b", "c", "d"]


@pytest.mark.resources
def test_wordnet_and_kjv_load():
    pairs = wordnet_pairs()
    assert len(pairs) == 117_659
    assert pairs[0] == Pair("entity", "that which is perceived or known or inferred to have its own distinct "
                                      "existence (living or nonliving)", "noun")
    assert sum('"' in p.candidate for p in pairs[:2000]) <= 2  # usage examples stripped (quotes inside stay)
    train, held = retrieval_split(pairs, num_eval=2000, seed=0)
    assert len(held) == 2000 and len(train) > 100_000
    verses = kjv_sentences()
    assert len(verses) == 31_102 and verses[0].startswith("In the beginning God created")
    assert len(kjv_sentences(100, seed=1)) == 100


@pytest.mark.resources
def test_wordnet_synonym_gloss_pairs_use_the_other_lemmas():
    from kdistill.data.text import wordnet_synonym_gloss_pairs

    syn = wordnet_synonym_gloss_pairs(pos=("noun",))
    by_gloss = {}
    for p in wordnet_pairs(pos=("noun",)):
        by_gloss.setdefault(p.candidate, set()).add(p.query)
    assert len(syn) > 10_000
    # every synonym pair's definition is a synset's definition, and its lemma is not that synset's first lemma
    assert all(p.candidate in by_gloss for p in syn[:2000])
    assert sum(p.query in by_gloss[p.candidate] for p in syn[:2000]) < 20  # (only lemmas repeated in a synset)
    car = [p.query for p in syn if p.candidate.startswith("a motor vehicle with four wheels")]
    assert {"auto", "automobile"} <= set(car)
