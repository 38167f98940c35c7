"""Metrics against trec_eval (pytrec_eval) and exact top-k against a full sort."""
from __future__ import annotations

import math

import numpy as np
import pytest

from mimic_engine.errors import InputError
from mimic_engine.metrics import METRICS, compute_metrics, exact_topk, per_query_metrics, query_metrics

pytrec_eval = pytest.importorskip("pytrec_eval", reason="pytrec_eval-terrier is the reference implementation")


def random_case(seed: int, n_queries: int = 40, n_docs: int = 400):
    """Random qrels (1..50 positives) and runs (150 docs, distinct scores); some queries retrieve
    no positive, some are missing from the run, one has no positive at all."""
    rng = np.random.default_rng(seed)
    docs = [f"d{i}" for i in range(n_docs)]
    qrels, run = {}, {}
    for q in range(n_queries):
        qid = f"q{q}"
        n_pos = int(rng.integers(1, 51))
        pos = set(rng.choice(n_docs, size=n_pos, replace=False).tolist())
        qrels[qid] = {docs[i]: 1 for i in pos}
        if q % 10 == 9:
            continue  # missing from the run: scores 0
        pool = np.array([i for i in range(n_docs) if i not in pos]) if q % 7 == 3 else np.arange(n_docs)
        ranked = rng.choice(pool, size=150, replace=False)
        scores = np.sort(rng.random(150))[::-1] * 10 + np.linspace(1e-3, 0, 150)  # strictly decreasing
        run[qid] = [(docs[i], float(s)) for i, s in zip(ranked, scores)]
    qrels["q_no_positive"] = {}
    run["q_no_positive"] = [("d0", 1.0)]
    return qrels, run


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_matches_pytrec_eval(seed):
    qrels, run = random_case(seed)
    scored = {q: {d: s for d, s in pairs} for q, pairs in run.items()}
    top10 = {q: {d: s for d, s in pairs[:10]} for q, pairs in run.items()}  # run is already in score order
    ref = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut_10", "recall_20", "recall_100"}).evaluate(scored)
    ref_rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(top10)
    ours = per_query_metrics(run, qrels)

    evaluated = [q for q in qrels if qrels[q]]
    assert sorted(ours) == sorted(evaluated)
    assert any(ours[q]["Recall@100"] == 0 for q in run if q in ours)  # some query retrieved no positive
    for qid in ref:
        assert ours[qid]["MRR@10"] == pytest.approx(ref_rr[qid]["recip_rank"], abs=1e-9)
        assert ours[qid]["NDCG@10"] == pytest.approx(ref[qid]["ndcg_cut_10"], abs=1e-9)
        assert ours[qid]["Recall@20"] == pytest.approx(ref[qid]["recall_20"], abs=1e-9)
        assert ours[qid]["Recall@100"] == pytest.approx(ref[qid]["recall_100"], abs=1e-9)

    # averages: over every query with a positive; one missing from the run counts 0
    mean = compute_metrics(run, qrels)
    names = {"MRR@10": ("recip_rank", ref_rr), "NDCG@10": ("ndcg_cut_10", ref), "Recall@20": ("recall_20", ref),
             "Recall@100": ("recall_100", ref)}
    for metric, (measure, table) in names.items():
        expected = sum(table[q][measure] if q in table else 0.0 for q in evaluated) / len(evaluated)
        assert mean[metric] == pytest.approx(expected, abs=1e-9)


def test_ranked_list_form_equals_scored_form():
    qrels, run = random_case(5)
    as_lists = {q: [d for d, _ in pairs] for q, pairs in run.items()}
    shuffled = {q: list(reversed(pairs)) for q, pairs in run.items()}  # order comes from the scores
    assert compute_metrics(as_lists, qrels) == compute_metrics(run, qrels) == compute_metrics(shuffled, qrels)


def test_hand_computed_values():
    rel = {"a": 1, "b": 1, "z": 0}
    m = query_metrics(["x", "a", "y", "b"], rel)
    assert m["MRR@10"] == 0.5
    dcg = 1 / math.log2(3) + 1 / math.log2(5)
    assert m["NDCG@10"] == pytest.approx(dcg / (1 + 1 / math.log2(3)))
    assert m["Recall@20"] == m["Recall@100"] == 1.0
    assert query_metrics(["a", "b"], rel) == {"MRR@10": 1.0, "NDCG@10": 1.0, "Recall@20": 1.0, "Recall@100": 1.0}


def test_edge_cases():
    # first positive at rank 11: no MRR@10 / NDCG@10 credit, but Recall@20 sees it
    ranking = [f"n{i}" for i in range(10)] + ["p"]
    m = query_metrics(ranking, {"p": 1})
    assert m["MRR@10"] == 0.0 and m["NDCG@10"] == 0.0 and m["Recall@20"] == 1.0
    # rank 101 is outside Recall@100
    assert query_metrics([f"n{i}" for i in range(100)] + ["p"], {"p": 1})["Recall@100"] == 0.0
    # more than 10 relevant: ideal DCG uses 10 of them, so a perfect top 10 is 1
    rel = {f"p{i}": 1 for i in range(30)}
    m = query_metrics([f"p{i}" for i in range(10)], rel)
    assert m["NDCG@10"] == pytest.approx(1.0) and m["Recall@20"] == pytest.approx(10 / 30)
    # a duplicated doc counts once, at its best rank
    m = query_metrics(["p", "p", "q"], {"p": 1, "q": 1})
    assert m["NDCG@10"] == pytest.approx(1.0)
    # ties in scores keep list order
    assert query_metrics([("n", 1.0), ("p", 1.0)], {"p": 1})["MRR@10"] == 0.5
    # empty ranking, missing query, queries without positives
    assert query_metrics([], {"p": 1}) == {m: 0.0 for m in METRICS}
    assert compute_metrics({}, {"q": {"p": 1}}) == {m: 0.0 for m in METRICS}
    assert compute_metrics({"q": ["p"]}, {"q": {"p": 1}, "empty": {}, "zero": {"x": 0}})["MRR@10"] == 1.0
    assert all(math.isnan(v) for v in compute_metrics({"q": ["p"]}, {"q": {}}).values())
    with pytest.raises(InputError, match="relevant"):
        query_metrics(["p"], {})


def test_exact_topk_matches_full_sort():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((37, 16)).astype(np.float32)
    d = rng.standard_normal((503, 16)).astype(np.float32)
    scores, idx = exact_topk(q, d, k=100, max_scores=2000)  # forces chunks of 3 queries
    full = q @ d.T
    ref = np.argsort(-full, axis=1, kind="stable")[:, :100]
    np.testing.assert_array_equal(idx, ref)
    np.testing.assert_allclose(scores, np.take_along_axis(full, ref, axis=1), rtol=1e-6)
    assert idx.dtype == np.int64 and scores.dtype == np.float32


def test_exact_topk_ties_and_small_corpus():
    # docs 0, 2, 4, 6 are identical: equal scores order by index, also at the k-th place
    d = np.zeros((8, 4), dtype=np.float32)
    d[::2, 0] = 1.0
    d[1::2, 1] = 0.5
    q = np.array([[1.0, 0.0, 0, 0], [0.0, 1.0, 0, 0]], dtype=np.float32)
    _, idx = exact_topk(q, d, k=3)
    np.testing.assert_array_equal(idx, [[0, 2, 4], [1, 3, 5]])
    _, idx = exact_topk(q[:1], d, k=6)
    np.testing.assert_array_equal(idx, [[0, 2, 4, 6, 1, 3]])
    scores, idx = exact_topk(q, d, k=100)  # k > N: the whole corpus, ranked
    assert idx.shape == (2, 8) and sorted(idx[0].tolist()) == list(range(8))
    with pytest.raises(InputError, match="same E"):
        exact_topk(q, np.zeros((3, 5), np.float32))
    with pytest.raises(InputError, match="k=0"):
        exact_topk(q, d, k=0)


def test_recall_at_k_counts_each_relevant_document_once():
    from mimic_engine.metrics import recall_at_k

    ranking = ["a", "b", "a", "c", "d"]  # "a" repeated: it counts once, at its best rank
    assert recall_at_k(ranking, {"a", "c", "z"}, 2) == pytest.approx(1 / 3)
    assert recall_at_k(ranking, {"a", "c", "z"}, 3) == pytest.approx(2 / 3)  # ranks after dedup: a, b, c
    assert recall_at_k([("b", 0.1), ("a", 0.9)], {"a": 1, "b": 0}, 1) == 1.0  # scored pairs; relevance 0 is not relevant
    with pytest.raises(InputError, match="relevant"):
        recall_at_k(ranking, {"a": 0}, 10)
