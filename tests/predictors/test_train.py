
import pytest
import torch

from dejavu.predictors.model import PredictorFileError, PredictorSet
from dejavu.predictors.train import labels_from, selection_metrics, train_predictors


def test_predictors_beat_random_selection(tiny_calibration):
    model, cal = tiny_calibration
    ps = train_predictors(cal, model.spec, mlp_rank=16, head_rank=8, epochs=30, lr=1e-2, progress=False)
    m, h = ps.meta["metrics"]["mlp"], ps.meta["metrics"]["heads"]
    # random selection of the same size recalls k/N = the label fraction (0.5) of the oracle top-k
    mlp_recall = sum(x["recall_at_k"] for x in m) / len(m)
    assert mlp_recall > 0.7, m
    head_recall = sum(x["recall_at_k"] for x in h) / len(h)
    assert head_recall > 0.6, h
    for row in m:
        assert 0.45 < row["true_density"] < 0.55


def test_labels_and_metrics():
    v = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 0.0, 1.0]])
    assert labels_from(v, "positive", 0).tolist() == [[False, True, True, True], [True, False, False, True]]
    assert labels_from(v, "top_frac", 0.5).tolist() == [[False, True, False, True], [True, False, False, True]]
    perfect = selection_metrics(v - 1.5, labels_from(v, "top_frac", 0.5), v)
    assert perfect["recall_at_k"] == 1.0


def test_save_load_round_trip_and_bad_files(tiny_calibration, tmp_path):
    model, cal = tiny_calibration
    ps = train_predictors(cal, model.spec, mlp_rank=8, head_rank=4, epochs=1, progress=False)
    ps.save(tmp_path)
    back = PredictorSet.load(tmp_path, model.spec)
    x = torch.randn(5, model.spec.d_model)
    for l in range(model.spec.n_layers):
        torch.testing.assert_close(back.neuron_scores(l, x), ps.neuron_scores(l, x))
        torch.testing.assert_close(back.head_scores(l, x), ps.head_scores(l, x))
    assert not list(tmp_path.glob("*.tmp"))

    # predictors made for another model
    from dataclasses import replace
    other = replace(model.spec, ffn_dim=model.spec.ffn_dim + 1)
    with pytest.raises(PredictorFileError, match="another model.*ffn_dim"):
        PredictorSet.load(tmp_path, other)
    # truncated weights
    w = tmp_path / "predictors.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    with pytest.raises(PredictorFileError, match="truncated or corrupt"):
        PredictorSet.load(tmp_path, model.spec)
    # corrupt metadata
    w.write_bytes(data)
    (tmp_path / "predictors.json").write_text("{not json")
    with pytest.raises(PredictorFileError, match="corrupt"):
        PredictorSet.load(tmp_path, model.spec)
    with pytest.raises(PredictorFileError, match="holds no predictors"):
        PredictorSet.load(tmp_path / "missing", model.spec)
