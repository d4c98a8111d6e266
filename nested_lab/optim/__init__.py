"""Optimizers: the ContinuumOptimizer replica, its controller and meta-losses; adaptive clipping."""

from nested_lab.optim.apollo import APOLLO
from nested_lab.optim.clipping import AdaptiveClipper
from nested_lab.optim.continuum import META_LOSSES, VARIANTS, ContinuumConfig, ContinuumOptimizer
from nested_lab.optim.controller import INPUT_SCALINGS, LRController, multiplier
from nested_lab.optim.unrolled import UnrollProblem

__all__ = ["APOLLO", "INPUT_SCALINGS", "META_LOSSES", "VARIANTS", "AdaptiveClipper", "ContinuumConfig",
           "ContinuumOptimizer", "LRController", "UnrollProblem", "multiplier"]
