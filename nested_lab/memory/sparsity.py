"""Which tokens a cortical column processes: CortexGPT's sparse activation.

Each of CortexGPT's columns scores every token of the flattened batch
(``N = B * T`` tokens) with its gate ``Linear(d, 1)`` and keeps a fraction of them.
The sparsity is over *tokens*, not over neurons. Selections (the original's first):

* ``"hard_topk"``: the ``k = max(1, int(fraction * N))`` best-scored tokens get mask
  1, the rest 0. ``topk`` is not differentiable, so no gradient reaches the gate.
* ``"gumbel_topk"`` (solutions document, ``DifferentiableSparseActivation``): in
  training, Gumbel noise ``g = -log(-log U)`` perturbs the scores,
  ``s~ = (s + g) / T`` with a learned temperature ``T``; the threshold is the k-th
  largest *noisy* score ``s~_k``, and the weight is ``sigmoid((s~ - s~_k) / tau)``
  (the document's ``* 10`` is ``tau = 0.1``), so about ``k`` tokens pass; hard
  top-k in evaluation. ``F.gumbel_softmax`` returns a softmax of the noisy scores,
  not the scores, so the noise is drawn directly here.
* ``"gumbel_dim0"`` (the shipped ``cortex_gpt_unified.py``): in training,
  ``F.gumbel_softmax(scores, tau, dim=0)`` -- a softmax over all ``N`` tokens,
  weights that sum to one over the batch (about ``1/N`` each); hard top-k 0/1 in
  evaluation. Train and evaluation outputs differ in scale by a factor of about ``N``.

All noise comes from the caller's generator. ``F.gumbel_softmax`` draws from
torch's global generator, so it runs inside :func:`nested_lab.runtime.seeded` with
a seed drawn from the caller's generator: results are reproducible and the
global state is left untouched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nested_lab import runtime

SELECTIONS = ("hard_topk", "gumbel_topk", "gumbel_dim0")


def hard_topk_mask(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """``[C, N]`` scores -> 0/1 mask keeping the best ``max(1, int(fraction * N))`` of each row."""
    k = max(1, int(fraction * scores.shape[-1]))
    top = scores.detach().topk(k, dim=-1).indices
    return torch.zeros_like(scores).scatter_(-1, top, 1.0)


def select_tokens(scores: torch.Tensor, fraction: float, selection: str, training: bool, tau: float,
                  generator: torch.Generator, temperature: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token weights ``[C, N]`` for column scores ``[C, N]`` (see the module docstring);
    ``temperature`` ``[C, 1]`` is the learned Gumbel temperature of ``"gumbel_topk"``.

    Runs in every forward pass and trusts its caller: ``selection`` one of :data:`SELECTIONS`,
    ``fraction`` in ``(0, 1]``, ``tau > 0`` (checked once by ``CortexConfig``)."""
    if selection == "hard_topk" or not training:
        return hard_topk_mask(scores, fraction)
    if selection == "gumbel_dim0":
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        with runtime.seeded(seed, scores.device):
            return F.gumbel_softmax(scores[..., None], tau=tau, hard=False, dim=-2)[..., 0]
    if temperature is None:
        raise ValueError("selection 'gumbel_topk' needs the learned temperature")
    uniform = torch.rand(scores.shape, generator=generator).to(scores.device)
    noisy = (scores - torch.log(-torch.log(uniform + 1e-8) + 1e-8)) / temperature
    k = max(1, int(fraction * scores.shape[-1]))
    threshold = noisy.topk(k, dim=-1).values[..., -1:]
    return torch.sigmoid((noisy - threshold) / tau)
