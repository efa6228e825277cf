import math

import pytest
import torch

from dejavu.accounting import bytes_summary
from dejavu.operating_point import choose_operating_point, policy_from_operating_point
from dejavu.predictors.train import train_predictors


@pytest.fixture(scope="module")
def trained(tiny_calibration):
    model, cal = tiny_calibration
    return model, train_predictors(cal, model.spec, mlp_rank=16, head_rank=8, epochs=10, lr=1e-2, progress=False)


@pytest.mark.parametrize("mode", ["topk", "threshold"])
def test_operating_point_stays_within_budget(trained, mode):
    model, ps = trained
    ids = torch.randint(1, model.spec.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    small = choose_operating_point(model, ps, ids, 0.002, mode=mode, mlp_levels=(0.75, 0.5), progress=False)
    large = choose_operating_point(model, ps, ids, 0.5, mode=mode, mlp_levels=(0.75, 0.5), progress=False)
    for op, budget in ((small, 0.002), (large, 0.5)):
        assert op["holdout_ppl_increase"] <= budget + 1e-9
        assert set(op["mlp_density"]) <= {1.0, 0.75, 0.5}
        assert op["bytes"]["block_bytes_skipped"] == pytest.approx(
            bytes_summary(model.spec, op["mlp_density"], op["head_density"])["block_bytes_skipped"])
        # the saved point reproduces its measured loss
        pol = policy_from_operating_point(ps, op)
        with torch.no_grad():
            dense = model(ids, sparsity=None)
            sparse = model(ids, sparsity=pol)
        nll = lambda lg: torch.nn.functional.cross_entropy(lg[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item()  # noqa: E731
        assert math.expm1(nll(sparse) - nll(dense)) == pytest.approx(op["holdout_ppl_increase"], abs=1e-4)
    assert large["bytes"]["block_bytes_skipped"] >= small["bytes"]["block_bytes_skipped"]
    assert large["bytes"]["block_bytes_skipped"] > 0


def test_bad_budget(trained):
    model, ps = trained
    with pytest.raises(ValueError, match="fraction"):
        choose_operating_point(model, ps, torch.ones(1, 8, dtype=torch.long), 5.0)
