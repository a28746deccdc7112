"""The faiss kNN cache classifier and `neighbors`."""
from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from cli import main
from pipeline.errors import UserError
from stages.evaluate.knn import cache_logits, neighbors as run_neighbors, search
from stages.evaluate.run import evaluate as run_evaluate
from stages.evaluate.config import EvaluateConfig, NeighborsConfig


def evaluate(features, out, **options):
    return run_evaluate(EvaluateConfig(features=str(features), out=str(out), **options))


def neighbors(features, key, **options):
    return run_neighbors(NeighborsConfig(features=str(features), key=key, **options))

pytestmark = pytest.mark.usefixtures("single_thread")



@pytest.mark.parametrize("gamma", [0.0, 0.5])
def test_cache_matches_brute_force(gamma):
    g = torch.Generator().manual_seed(0)
    db = torch.nn.functional.normalize(torch.randn(300, 12, generator=g), dim=-1)
    queries = torch.nn.functional.normalize(torch.randn(40, 12, generator=g), dim=-1)
    labels = torch.randint(0, 7, (300,), generator=g)
    counts = torch.bincount(labels, minlength=8)  # class 7: no train samples, never voted for
    k, beta = 9, 3.0

    sims, idx = search(db, queries, k)
    got = cache_logits(sims, idx, labels, counts, beta, gamma)

    cos = queries @ db.T
    top, nn = cos.topk(k, dim=1)
    expected = torch.zeros(40, 8)
    for q in range(40):
        for s, j in zip(top[q], nn[q]):
            c = labels[j]
            expected[q, c] += torch.exp(-beta * (1 - s)) / counts[c].double() ** gamma
    assert torch.allclose(sims, top, atol=1e-5)
    assert torch.allclose(got, expected, atol=1e-5)
    assert (got[:, 7] == 0).all()


def test_knn_fusion_in_evaluate(lt_store, tmp_path):
    base = evaluate(lt_store, tmp_path / "a")
    silent = evaluate(lt_store, tmp_path / "b", knn_k=10, knn_alpha=0.0)
    assert silent == base
    fused = evaluate(lt_store, tmp_path / "c", knn_k=10, knn_alpha=5.0, knn_beta=5.0, knn_gamma=0.5)
    assert fused != base and 0 <= fused["few"] <= 100
    with pytest.raises(UserError, match="--knn-k"):
        evaluate(lt_store, tmp_path / "d", knn_k=-1)


def test_neighbors(lt_store):
    from store.features import FeatureStore

    store = FeatureStore.open(lt_store)
    key = str(store.keys("train")[5])
    r = neighbors(lt_store, key, k=4, split="train")
    assert r["neighbors"][0]["key"] == key and r["neighbors"][0]["cosine"] == pytest.approx(1.0, abs=1e-3)
    assert [n["rank"] for n in r["neighbors"]] == [1, 2, 3, 4]
    cosines = [n["cosine"] for n in r["neighbors"]]
    assert cosines == sorted(cosines, reverse=True)
    with pytest.raises(UserError, match="--key nope"):
        neighbors(lt_store, "nope")

    runner = CliRunner()
    test_key = str(store.keys("test")[0])
    out = runner.invoke(main, ["neighbors", "--features", str(lt_store), "--key", test_key, "--k", "3"])
    assert out.exit_code == 0, out.output
    assert test_key in out.output and len(out.output.strip().splitlines()) == 2 + 3
    out = runner.invoke(main, ["neighbors", "--features", str(lt_store), "--key", "nope"])
    assert out.exit_code != 0 and "Error: --key nope" in out.output
