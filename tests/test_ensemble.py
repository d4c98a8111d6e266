"""The vectorised ensemble reproduces separate ContinuumOptimizer runs, seed for seed."""

from __future__ import annotations

import pytest
import torch

from nested_lab.experiments import meta_loss_collapse
from nested_lab.optim import ContinuumConfig
from nested_lab.optim.ensemble import ContinuumEnsemble

TASK = meta_loss_collapse.CharTask(embed=8, hidden=32, batch_size=16)


@pytest.mark.parametrize("meta_loss", ["regularization", "proxy", "hypergradient"])
def test_ensemble_matches_separate_runs(meta_loss):
    config = ContinuumConfig.original(update_freq=5, meta_loss=meta_loss, proxy_warmup=2)
    seeds = [0, 3]
    together = meta_loss_collapse.train_ensemble(config, seeds, 25, TASK, norm_scale=3.0)
    for i, seed in enumerate(seeds):
        alone = meta_loss_collapse.train(config, seed, 25, TASK, norm_scale=3.0)
        assert torch.allclose(together.multipliers[:, i], alone.multipliers, atol=1e-5)
        assert torch.allclose(together.train_loss[:, i], torch.tensor(alone.train_loss), atol=1e-4)
    assert together.multipliers[4:, :, :].ne(1.0).any()


def test_ensemble_rejects_unsupported_settings():
    params = {"w": torch.zeros(2, 3, requires_grad=True)}
    with pytest.raises(ValueError, match="unknown ContinuumEnsemble meta_loss 'unrolled'"):
        ContinuumEnsemble([{"params": params}], ContinuumConfig(meta_loss="unrolled"), [0, 1])
    with pytest.raises(ValueError, match="unknown ContinuumEnsemble variant 'deep_nested'"):
        ContinuumEnsemble([{"params": params}], ContinuumConfig(variant="deep_nested"), [0, 1])
    with pytest.raises(ValueError, match="leading ensemble dimension of 3"):
        ContinuumEnsemble([{"params": params}], ContinuumConfig(), [0, 1, 2])
    with pytest.raises(ValueError, match="number of seeds must be >= 1"):
        meta_loss_collapse.train_ensemble(ContinuumConfig(), [], 5)
