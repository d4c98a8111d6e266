"""The delta rule: a linear-attention memory written by one SGD step per token.

Shapes (one notation in this file and in :mod:`nested_lab.memory.titans`)::

    B   batch                         Dk  key (and query) width
    H   heads                         Dv  value width
    T   sequence length (tokens)      C   chunk size
    N   chunks, ceil(T / C)           S   the state, (B, H, Dk, Dv)

Yang et al. 2024 ("Parallelizing Linear Transformers with the Delta Rule over
Sequence Length", NeurIPS 2024, Eq. 1; after Schlag et al. 2021) write, in the
column-vector convention with a state ``S`` of shape ``Dv x Dk``,

    S_t = S_{t-1} - beta_t (S_{t-1} k_t - v_t) k_t^T,        o_t = S_t q_t,

one gradient step of size ``beta_t`` on the regression loss ``1/2 ||S k_t - v_t||^2``;
the read-out uses the state *after* token t's write.

Convention of this module: rows. Tokens are row vectors and the state is the
transpose, ``S`` of shape ``(Dk, Dv)``:

    S_t = S_{t-1} + beta_t k_t^T (v_t - k_t S_{t-1}),        o_t = q_t S_t.

Three forms, the same numbers up to rounding (tests/test_delta_rule.py):

* :func:`delta_rule_recurrent` runs this one token at a time (the reference);
* :func:`delta_rule_chunkwise_reference` is the chunkwise form of Yang et al. (Sec. 3,
  the WY / UT representation, Eqs. 7-8) written plainly, one chunk at a time: for a chunk
  of ``C`` tokens ``K``, ``V``, ``Q`` (``C x Dk``, ``C x Dv``, ``C x Dk``) and steps
  ``beta``, with ``S`` the state at the chunk's start,

      A = tril(diag(beta) K K^T, -1),    T = (I + A)^{-1} diag(beta),    W = T K,    U = T V,
      delta = U - W S,    O = Q S + tril(Q K^T) delta,    S <- S + K^T delta;

* :func:`delta_rule_chunked` computes the same, fast. Everything but ``S`` is known
  before the recurrence across chunks, so ``A``, ``T``, ``W``, ``U`` and the causal scores
  ``tril(Q K^T)`` are built for many chunks at once, as batched matrix products; the loop
  over chunks then makes two small products per chunk (``delta = U - W S``,
  ``S <- S + K^T delta``), and the outputs of all those chunks follow from the states at
  their starts in two more batched products. Long sequences are processed
  ``SEGMENT_ROWS`` token rows (all heads together) at a time, so that the temporaries
  stay in cache.

The kernels trust their callers: ``q``, ``k``, ``v``, ``beta`` and ``initial_state`` of the
shapes above, one floating dtype and one device, ``beta`` in ``[0, 1]`` (the layers draw it
from a sigmoid). Only the plain options of :func:`delta_rule_chunked` are checked.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nested_lab.parameters import check_choice, check_positive_ints

INVERSES = ("solve", "substitution")
SEGMENT_ROWS = 2048  # token rows (batch x heads x tokens) per segment of the chunked form (of 1024-4096, fastest on 2 CPU cores)
SOLVE_BLOCK = 16  # the largest triangular system solved directly when inverting I + A


def delta_rule_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                         initial_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The delta rule token by token (Yang et al. 2024, Eq. 1, row convention):
    ``S_t = S_{t-1} + beta_t k_t^T (v_t - k_t S_{t-1})``, ``o_t = q_t S_t``.

    ``q``, ``k``: ``(B, H, T, Dk)``; ``v``: ``(B, H, T, Dv)``; ``beta``: ``(B, H, T)`` in [0, 1];
    ``initial_state``: ``(B, H, Dk, Dv)`` or ``None`` (zeros). Returns the outputs ``(B, H, T, Dv)``
    and the final state ``(B, H, Dk, Dv)``.
    """
    state = _initial_state(initial_state, q, v)  # (B, H, Dk, Dv)
    outputs = []
    for q_t, k_t, v_t, beta_t in zip(q.unbind(2), k.unbind(2), v.unbind(2), beta.unbind(2), strict=True):
        error = v_t - (k_t.unsqueeze(-2) @ state).squeeze(-2)  # v_t - k_t S_{t-1}: (B, H, Dv)
        state = state + (beta_t.unsqueeze(-1) * k_t).unsqueeze(-1) * error.unsqueeze(-2)  # Eq. 1
        outputs.append((q_t.unsqueeze(-2) @ state).squeeze(-2))  # o_t = q_t S_t: (B, H, Dv)
    return torch.stack(outputs, dim=2), state


def delta_rule_chunkwise_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                                   chunk_size: int = 64, initial_state: torch.Tensor | None = None
                                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunkwise form of Yang et al. 2024 (Sec. 3, the UT transform, Eqs. 7-8) in their symbols
    (lower case, row convention), one chunk of ``C = chunk_size`` tokens at a time, the last
    possibly shorter: the plain reference for :func:`delta_rule_chunked`, which computes the same
    with batched products. Same arguments and returns as :func:`delta_rule_recurrent`.
    """
    s = _initial_state(initial_state, q, v)  # S at the first chunk's start: (B, H, Dk, Dv)
    o = []
    for start in range(0, q.shape[2], chunk_size):
        chunk = slice(start, start + chunk_size)
        q_i, k_i, v_i = q[:, :, chunk], k[:, :, chunk], v[:, :, chunk]  # (B, H, C, Dk | Dk | Dv)
        beta_i = beta[:, :, chunk, None]  # (B, H, C, 1)
        eye = torch.eye(k_i.shape[2], dtype=k_i.dtype, device=k_i.device)
        a_i = (beta_i * k_i @ k_i.mT).tril(-1)  # A = tril(diag(beta) K K^T, -1): (B, H, C, C)
        t_i = torch.linalg.inv(eye + a_i) * beta_i.mT  # T = (I + A)^{-1} diag(beta)   (Eqs. 7-8)
        w_i, u_i = t_i @ k_i, t_i @ v_i  # W = T K, U = T V   (Eqs. 7-8): (B, H, C, Dk | Dv)
        delta_i = u_i - w_i @ s  # the pseudo-values U - W S: (B, H, C, Dv)
        o.append(q_i @ s + (q_i @ k_i.mT).tril() @ delta_i)  # O = Q S + tril(Q K^T) (U - W S)   (Sec. 3)
        s = s + k_i.mT @ delta_i  # S <- S + K^T (U - W S)   (Sec. 3)
    return torch.cat(o, dim=2), s


def delta_rule_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                       chunk_size: int = 64, initial_state: torch.Tensor | None = None,
                       inverse: str = "solve") -> tuple[torch.Tensor, torch.Tensor]:
    """The delta rule in chunks of ``chunk_size`` tokens (Yang et al. 2024, Sec. 3, Eqs. 7-8: the
    UT transform), optimised; the same numbers as :func:`delta_rule_chunkwise_reference` and
    :func:`delta_rule_recurrent`, up to rounding.

    A length that is not a multiple of ``chunk_size`` is padded with tokens of ``beta = 0`` and zero
    keys, which leave the state unchanged, and the outputs are cut back.
    ``inverse``: how ``(I + A)^{-1}`` is computed, ``"solve"`` (batched triangular solves for all
    chunks at once, see :func:`_unit_lower_inverse`) or ``"substitution"`` (textbook forward
    substitution, a Python loop over the rows of a chunk). Same arguments and returns as
    :func:`delta_rule_recurrent`.
    """
    check_positive_ints(chunk_size=chunk_size)
    check_choice("inverse", inverse, INVERSES)
    state = _initial_state(initial_state, q, v)
    batch, heads, length, key_dim = q.shape
    value_dim = v.shape[-1]
    chunks = -(-length // chunk_size)  # N
    tensors = [_chunked(x, chunks, chunk_size) for x in (q, k, v, beta.unsqueeze(-1))]  # (B * H, N, C, .)
    state = state.reshape(batch * heads, key_dim, value_dim)
    per_segment = max(1, SEGMENT_ROWS // (batch * heads * chunk_size))  # chunks per segment
    outputs = []
    for first in range(0, chunks, per_segment):
        part = slice(first, first + per_segment)
        segment_outputs, state = _segment(*(x[:, part].flatten(0, 1) for x in tensors), state, inverse)
        outputs.append(segment_outputs)
    outputs = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)  # (B * H, N * C, Dv)
    return outputs.view(batch, heads, -1, value_dim)[:, :, :length], state.view(batch, heads, key_dim, value_dim)


def _initial_state(initial_state: torch.Tensor | None, q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``initial_state``, or zeros of shape ``(B, H, Dk, Dv)``."""
    if initial_state is None:
        return q.new_zeros(*q.shape[:2], q.shape[-1], v.shape[-1])
    return initial_state


def _segment(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, beta: torch.Tensor,
             state: torch.Tensor, inverse: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Consecutive chunks, as ``(B * H * n, C, .)`` tensors (``n`` chunks per sequence), from the
    state ``(B * H, Dk, Dv)`` at their start: the outputs ``(B * H, n * C, Dv)`` and the state at
    their end."""
    weights, updates = _wy_factors(keys, values, beta, inverse)  # W, U: (B * H * n, C, Dk | Dv)
    scores = (queries @ keys.mT).tril_()  # tril(Q K^T): (B * H * n, C, C)
    starts, deltas, state = _scan(keys, weights, updates, state)
    outputs = (queries @ starts).baddbmm_(scores, deltas)  # O = Q S + tril(Q K^T) delta: (B * H * n, C, Dv)
    return outputs.view(state.shape[0], -1, outputs.shape[-1]), state


def _chunked(x: torch.Tensor, chunks: int, chunk_size: int) -> torch.Tensor:
    """``(B, H, T, D)`` -> ``(B * H, N, C, D)``, the tail padded with zeros."""
    padding = chunks * chunk_size - x.shape[2]
    if padding:
        x = F.pad(x, (0, 0, 0, padding))
    return x.reshape(x.shape[0] * x.shape[1], chunks, chunk_size, x.shape[-1])


def _wy_factors(keys: torch.Tensor, values: torch.Tensor, beta: torch.Tensor,
                inverse: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``W = T K`` and ``U = T V`` with ``T = (I + A)^{-1} diag(beta)``, ``A = tril(diag(beta) K K^T, -1)``
    (Yang et al. 2024, Eqs. 7-8), for every chunk at once: ``(..., C, Dk)`` and ``(..., C, Dv)``."""
    scaled_keys = beta * keys  # diag(beta) K
    lower = scaled_keys @ keys.mT  # A below the diagonal; the rest is never read: (..., C, C)
    inverted = _unit_lower_inverse(lower) if inverse == "solve" else _forward_substitution(lower.tril(-1))
    return inverted @ scaled_keys, inverted @ (beta * values)  # T K, T V with T = (I + A)^{-1} diag(beta)


def _unit_lower_inverse(lower: torch.Tensor) -> torch.Tensor:
    """``(I + tril(L, -1))^{-1}`` for a batch of ``L`` (``..., C, C``).

    Up to ``SOLVE_BLOCK`` rows: one batched triangular solve against the identity. Larger even
    sizes are split in halves; both diagonal halves are inverted together (one batch, recursively)
    and the corner follows from them: ``[[L11, 0], [L21, L22]]^{-1} = [[X11, 0], [-X22 L21 X11, X22]]``.
    The solver treats its batch one matrix at a time on one thread, while the products run on all
    of them, so small solves plus products beat one solve of full size."""
    size = lower.shape[-1]
    if size <= SOLVE_BLOCK or size % 2:
        identity = torch.eye(size, dtype=lower.dtype, device=lower.device).expand_as(lower)
        # posed as Y (I + L)^T = I, Y = X^T: the solver wants column-major matrices, which the
        # transposes of row-major tensors already are, so nothing is copied to reorder them
        return torch.linalg.solve_triangular(lower.mT, identity, upper=True, left=False, unitriangular=True).mT
    half = size // 2
    top, bottom = _unit_lower_inverse(torch.stack([lower[..., :half, :half], lower[..., half:, half:]]))
    inverted = lower.new_zeros(lower.shape)
    inverted[..., :half, :half] = top  # slice copies: torch.cat along the last dimension is far slower here
    inverted[..., half:, half:] = bottom
    inverted[..., half:, :half] = -(bottom @ lower[..., half:, :half]) @ top
    return inverted


def _forward_substitution(strict_lower: torch.Tensor) -> torch.Tensor:
    """``(I + L)^{-1}`` for a strictly lower-triangular ``L`` by forward substitution, a Python loop over
    the rows: once row ``i`` of the inverse is final it is eliminated from every row below it (out of
    place, so that autograd can follow)."""
    size = strict_lower.shape[-1]
    inverted = torch.eye(size, dtype=strict_lower.dtype, device=strict_lower.device).expand_as(strict_lower)
    for row in range(size - 1):
        inverted = torch.addcmul(inverted, strict_lower[..., row:row + 1], inverted[..., row:row + 1, :],
                                 value=-1)
    return inverted


def _scan(keys: torch.Tensor, weights: torch.Tensor, updates: torch.Tensor,
          state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The state recurrence across chunks (Yang et al. 2024, Sec. 3): ``delta = U - W S``,
    ``S <- S + K^T delta``.

    The chunk tensors are ``(B * H * n, C, .)``; ``state`` is ``(B * H, Dk, Dv)``. Returns every
    chunk's start state ``(B * H * n, Dk, Dv)`` and ``delta`` ``(B * H * n, C, Dv)``, and the final
    state."""
    def per_chunk(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return x.unflatten(0, (state.shape[0], -1)).unbind(1)

    starts, deltas = [], []
    for key_columns, weight, update in zip(per_chunk(keys.mT), per_chunk(weights), per_chunk(updates),
                                           strict=True):
        starts.append(state)
        deltas.append(torch.baddbmm(update, weight, state, alpha=-1))  # delta = U - W S
        state = torch.baddbmm(state, key_columns, deltas[-1])  # S <- S + K^T delta
    return torch.stack(starts, dim=1).flatten(0, 1), torch.stack(deltas, dim=1).flatten(0, 1), state
