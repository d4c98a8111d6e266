"""The neural long-term memory of Titans (Behrouz, Zhong & Mirrokni 2024, "Titans: Learning to
Memorize at Test Time", arXiv 2501.00663): an MLP whose weights are written at test time by
gradient descent with momentum and forgetting on an associative loss.

Shapes (one notation in this file and in :mod:`nested_lab.memory.delta_rule`)::

    B   batch (each sequence has its own memory)     Dk  key (and query) width
    T   sequence length (tokens)                     Dv  value width
    C   chunk size (the paper's b)                   Di, Do  one memory layer's fan-in and fan-out
    N   chunks, ceil(T / C)                          L   the memory's depth (layers)

The memory ``M`` is an MLP without biases, in the row convention ``x W``: depth 1 is the linear
map ``M(x) = x W_0``; depth ``L >= 2`` is ``Linear -> SiLU -> ... -> Linear``. Its weights are a
dict ``{"weight_0": W_0, ..., "weight_{L-1}": W_{L-1}}``, each ``(Di, Do)`` (``Dk`` into the first
layer, ``Dv`` out of the last), or ``(B, Di, Do)`` with one memory per sequence. Writing the pair
``(k_t, v_t)`` with the step size ``theta_t >= 0``, the momentum ``eta_t`` and the forgetting gate
``alpha_t`` (both in ``[0, 1]``) is

    l(M; k, v) = ||M(k) - v||^2                                   (the associative loss, Eq. 12)
    S_t = eta_t S_{t-1} - theta_t grad_M l(M_{t-1}; k_t, v_t)      (surprise with momentum, Eq. 10)
    M_t = (1 - alpha_t) M_{t-1} + S_t                              (forgetting, Eq. 13)
    y_t = M_t(q_t)                                                 (retrieval, Eq. 15)

with ``S_0 = 0``; the read at ``t`` sees the write at ``t``. Every sequence of a batch has its own
memory; all start from the same weights, which are outer-loop parameters: the outputs are
differentiable with respect to them, to the keys, values, queries and the gates.

:func:`titans_sequential` is the reference, one token at a time, with the per-token gradient
of ``torch.func.grad`` (:func:`token_gradients`). :func:`titans_chunked` is the chunk-parallel
form of the paper's Sec. 3.2: inside a chunk of ``C`` tokens every gradient is taken at the
weights of the chunk start, so the ``C`` gradients come from one batched forward and backward
pass; ``S`` and ``M`` are then linear recurrences in ``t`` whose solutions are weighted sums of
the gradients, the weights being products of the gates (:func:`_decay_matrix`, a cumulative
product). ``titans_sequential(gradient_every=C)`` takes its gradients at the same weights, so the
two agree up to rounding.

With ``gradient_form="vmap"`` the chunked form is the paper's as written: the chunk's gradients
by ``torch.func.vmap`` over ``torch.func.grad`` (:func:`token_gradients`), and every per-token
weight ``M_t`` formed from them (:func:`_chunk_from_gradients`). The default, ``"factored"``,
computes the same numbers with less work:
the gradient of the loss with respect to a layer's weight is an outer product,
``grad_{W_l} l = a_l^T d_l`` (the layer's input row ``a_l`` and the loss gradient ``d_l`` at its
output, :func:`gradient_factors`). The chunked form keeps the two factors and never forms the
per-token weights ``M_t``: a query's input ``x_t`` to a layer meets ``M_t`` as
``x_t M_t = A_t0 x_t M_0 + K_t0 x_t S_0 - sum_j K_tj theta_j (x_t . a_j) d_j``, the parallel form
of linear attention, with ``O(C^2 D)`` work per layer and chunk instead of the ``O(C^2 D^2)`` of
forming every ``M_t``.

The kernels trust their callers for tensors (shapes as above, one floating dtype and device,
gate tensors in range: the layers draw them from sigmoids); gates given as plain numbers and
the options are checked where they enter, :func:`titans_sequential` and :func:`titans_chunked`.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import grad, vmap

from nested_lab import runtime
from nested_lab.parameters import check_choice, check_positive_ints, check_range

GRADIENTS_AT = ("chunk_start", "call_start")
GRADIENT_FORMS = ("factored", "vmap")
Gate = float | Tensor


# --- the memory MLP ----------------------------------------------------------------------------

def init_memory(dim: int, depth: int = 2, hidden: int | None = None, out_dim: int | None = None,
                generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Weights of a memory MLP from ``dim`` inputs to ``out_dim`` outputs (default ``dim``).

    ``hidden`` (the width of the hidden layers, depth >= 2 only) defaults to ``2 * dim``. Each
    ``W_l`` ``(Di, Do)`` is drawn from ``N(0, 1 / Di)`` with ``generator`` (default: a generator
    seeded with 0).
    """
    check_positive_ints(dim=dim, depth=depth)
    out_dim = dim if out_dim is None else out_dim
    hidden = 2 * dim if hidden is None else hidden
    check_positive_ints(out_dim=out_dim, hidden=hidden)
    if generator is None:
        generator = runtime.generator(0)
    widths = [dim] + [hidden] * (depth - 1) + [out_dim]
    return {f"weight_{layer}": torch.randn(fan_in, fan_out, generator=generator) / math.sqrt(fan_in)
            for layer, (fan_in, fan_out) in enumerate(itertools.pairwise(widths))}


def memory_forward(params: dict[str, Tensor], x: Tensor) -> Tensor:
    """The memory MLP ``M(x)``: ``x W_0`` at depth 1, ``silu(... silu(x W_0) ...) W_{L-1}`` deeper.

    Shared weights ``(Di, Do)`` apply to ``x`` ``(..., Dk)``. Weights with leading batch
    dimensions ``(*lead, Di, Do)`` (a memory per sequence) apply to ``x`` ``(*lead, ..., Dk)``:
    each input row is read by the weights of its own leading index.
    """
    weights = _ordered_weights(params)
    lead = weights[0].shape[:-2]
    rows = x.reshape(*lead, -1, x.shape[-1]) if lead else x  # (*lead, rows, Dk)
    for layer, weight in enumerate(weights):
        rows = rows @ weight
        if layer < len(weights) - 1:
            rows = F.silu(rows)
    return rows.reshape(*x.shape[:-1], rows.shape[-1])  # (..., Dv)


def association_loss(params: dict[str, Tensor], key: Tensor, value: Tensor) -> Tensor:
    """``l(M; k, v) = ||M(k) - v||^2``, summed over features and rows (Titans, Eq. 12)."""
    return (memory_forward(params, key) - value).square().sum()


def token_gradients(params: dict[str, Tensor], keys: Tensor, values: Tensor) -> dict[str, Tensor]:
    """``grad_M l(M; k_t, v_t)`` of every token (Eq. 12), ``torch.func.vmap`` over ``torch.func.grad``.

    ``params``: one memory per sequence (weights ``(B, Di, Do)``); ``keys`` ``(B, T, Dk)``,
    ``values`` ``(B, T, Dv)`` -> a dict of gradients ``(B, T, Di, Do)``.
    """
    return _vmapped_gradients(params, keys, values)


# over the tokens of a sequence (its weights shared), then over the sequences
_vmapped_gradients = vmap(vmap(grad(association_loss), in_dims=(None, 0, 0)), in_dims=(0, 0, 0))


def gradient_factors(params: dict[str, Tensor], keys: Tensor, values: Tensor) -> list[tuple[Tensor, Tensor]]:
    """The same gradients as :func:`token_gradients`, as outer products ``grad_{W_l} = a_l^T d_l``.

    One forward and one backward pass by hand over all tokens: ``a_0 = k``, ``z_l = a_l W_l``,
    ``a_{l+1} = silu(z_l)``; ``d_{L-1} = 2 (M(k) - v)``, ``d_l = (d_{l+1} W_{l+1}^T) silu'(z_l)``.
    Returns per layer ``(a_l (B, T, Di), d_l (B, T, Do))``.
    """
    weights = _ordered_weights(params)
    inputs, pre_activations, rows = [], [], keys
    for layer, weight in enumerate(weights):
        inputs.append(rows)
        rows = rows @ weight
        if layer < len(weights) - 1:
            pre_activations.append(rows)
            rows = F.silu(rows)
    signals = [2 * (rows - values)]  # d_{L-1} = 2 (M(k) - v), the gradient of Eq. 12
    for layer in range(len(weights) - 1, 0, -1):
        signals.insert(0, (signals[0] @ weights[layer].mT) * _silu_derivative(pre_activations[layer - 1]))
    return list(zip(inputs, signals, strict=True))


def _silu_derivative(z: Tensor) -> Tensor:
    """``d silu(z) / dz = sigmoid(z) (1 + z (1 - sigmoid(z)))``."""
    gate = torch.sigmoid(z)
    return gate * (1 + z * (1 - gate))


def _ordered_weights(params: dict[str, Tensor]) -> list[Tensor]:
    """The weights ``weight_0 .. weight_{L-1}``, in order."""
    return [params[f"weight_{layer}"] for layer in range(len(params))]


# --- the reference: one token at a time --------------------------------------------------------

def titans_sequential(params: dict[str, Tensor], keys: Tensor, values: Tensor, queries: Tensor, *,
                      theta: Gate, eta: Gate, alpha: Gate, gradient_every: int = 1
                      ) -> tuple[Tensor, dict[str, Tensor]]:
    """Titans' memory (Eqs. 10, 13, 15) written and read token by token, a Python loop.

    ``params``: shared weights ``(Di, Do)`` (or one memory per sequence, ``(B, Di, Do)``);
    ``keys``, ``queries`` ``(B, T, Dk)``, ``values`` ``(B, T, Dv)``; ``theta``, ``eta``, ``alpha``:
    numbers or tensors ``(B, T)``. The gradient at token ``t`` is taken at the weights held before
    token ``g * floor(t / g)`` (``g = gradient_every``): ``g = 1`` is the exact recurrence, ``g = C``
    the semantics of :func:`titans_chunked` with ``chunk_size=C``. Returns the outputs
    ``(B, T, Dv)`` and the final memory (each weight ``(B, Di, Do)``).
    """
    check_positive_ints(gradient_every=gradient_every)
    memory, theta, eta, alpha = _per_sequence_memory_and_gates(params, keys, theta, eta, alpha)
    momentum = {name: torch.zeros_like(weight) for name, weight in memory.items()}  # S_0 = 0
    outputs = []
    for t in range(keys.shape[1]):
        if t % gradient_every == 0:
            anchor = memory
        surprise = token_gradients(anchor, keys[:, t : t + 1], values[:, t : t + 1])  # grad l, Eq. 12
        momentum = {name: _per_sequence(eta[:, t], weight) * weight  # S_t = eta S_{t-1} - theta grad, Eq. 10
                    - _per_sequence(theta[:, t], weight) * surprise[name][:, 0] for name, weight in momentum.items()}
        memory = {name: _per_sequence(1 - alpha[:, t], weight) * weight + momentum[name]  # Eq. 13
                  for name, weight in memory.items()}
        outputs.append(memory_forward(memory, queries[:, t : t + 1]))  # y_t = M_t(q_t), Eq. 15: (B, 1, Dv)
    return torch.cat(outputs, dim=1), memory


def _per_sequence(gate: Tensor, like: Tensor) -> Tensor:
    """A gate ``(B,)`` shaped to multiply per-sequence weights ``(B, ...)``."""
    return gate.reshape(-1, *([1] * (like.ndim - 1)))


# --- the chunk-parallel form -------------------------------------------------------------------

def titans_chunked(params: dict[str, Tensor], keys: Tensor, values: Tensor, queries: Tensor, *,
                   theta: Gate, eta: Gate, alpha: Gate, chunk_size: int = 64,
                   gradients_at: str = "chunk_start", gradient_form: str = "factored"
                   ) -> tuple[Tensor, dict[str, Tensor]]:
    """Titans' memory (Eqs. 10, 13, 15) in the chunk-parallel form of the paper's Sec. 3.2.

    Same arguments and results as :func:`titans_sequential`. Inside a chunk of ``chunk_size``
    tokens (the last may be shorter) every gradient is taken at the weights of the chunk start
    (``gradients_at="chunk_start"``, the paper) or, for every chunk, at the weights the call
    started with (``"call_start"``, a cheaper approximation: all gradients in one pass; it equals
    ``titans_sequential(gradient_every=T)`` whatever the chunk size). ``gradient_form``: ``"vmap"``
    takes the per-token gradients with ``torch.func`` and forms every ``M_t``; ``"factored"`` (the
    default) gets the same numbers from the gradients' outer-product factors (see the module
    docstring).
    """
    check_positive_ints(chunk_size=chunk_size)
    check_choice("gradients_at", gradients_at, GRADIENTS_AT)
    check_choice("gradient_form", gradient_form, GRADIENT_FORMS)
    memory, theta, eta, alpha = _per_sequence_memory_and_gates(params, keys, theta, eta, alpha)
    momentum = {name: torch.zeros_like(weight) for name, weight in memory.items()}  # S_0 = 0
    gradients, chunk_step = ((gradient_factors, _chunk) if gradient_form == "factored"
                             else (_layer_gradients, _chunk_from_gradients))
    at_call_start = gradients(memory, keys, values) if gradients_at == "call_start" else None
    outputs = []
    for begin in range(0, keys.shape[1], chunk_size):
        chunk = slice(begin, begin + chunk_size)
        if at_call_start is None:
            chunk_gradients = gradients(memory, keys[:, chunk], values[:, chunk])
        else:  # per layer, a tuple of tensors with time in dimension 1
            chunk_gradients = [tuple(part[:, chunk] for part in layer) for layer in at_call_start]
        output, memory, momentum = chunk_step(memory, momentum, chunk_gradients, queries[:, chunk],
                                              theta[:, chunk], eta[:, chunk], 1 - alpha[:, chunk])
        outputs.append(output)  # (B, C, Dv)
    return torch.cat(outputs, dim=1), memory


def _layer_gradients(memory: dict[str, Tensor], keys: Tensor, values: Tensor) -> list[tuple[Tensor]]:
    """:func:`token_gradients` in layer order, each ``((B, T, Di, Do),)`` (a 1-tuple, shaped
    like :func:`gradient_factors`' pairs)."""
    gradients = token_gradients(memory, keys, values)
    return [(gradients[f"weight_{layer}"],) for layer in range(len(memory))]


def _decay_matrix(gate: Tensor) -> Tensor:
    """The solution weights of ``X_t = gate_t X_{t-1} + u_t`` over a chunk of ``C`` tokens.

    ``gate`` ``(B, C)`` -> ``D`` ``(B, C, C + 1)`` with ``X_t = D[t, 0] X_start + sum_j D[t, j + 1] u_j``:
    ``D[t, j + 1] = prod_{i = j+1..t} gate_i`` for ``j <= t`` and 0 after ``t``. Built with one
    cumulative product along ``t`` per starting point, so a gate of exactly 0 is handled (a ratio
    of cumulative products would divide by it).
    """
    size = gate.shape[-1]
    start = torch.arange(size + 1, device=gate.device)[:, None]  # r = j + 1, the first factor's index
    token = torch.arange(size, device=gate.device)[None, :]
    factors = torch.where(token >= start, gate[:, None, :], torch.ones((), dtype=gate.dtype, device=gate.device))
    products = factors.cumprod(dim=-1)  # (B, C + 1, C): [b, r, t] = prod_{i = r..t} gate_i
    return (products * (token >= start - 1)).transpose(1, 2)


def _mixing(theta: Tensor, eta: Tensor, keep: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The weights of a chunk's recurrences (see :func:`_chunk`): ``E`` and ``A``, the
    :func:`_decay_matrix` of ``eta`` (Eq. 10) and of ``1 - alpha`` (Eq. 13), ``(B, C, C + 1)``;
    ``K = A[:, 1:] E``; and ``K[t, j+1] theta_j`` ``(B, C, C)``, the weight of token ``j``'s
    gradient in ``-M_t``."""
    momentum_decay, keep_decay = _decay_matrix(eta), _decay_matrix(keep)  # E, A
    kernel = keep_decay[..., 1:] @ momentum_decay  # K = A[:, 1:] E
    return momentum_decay, keep_decay, kernel, kernel[..., 1:] * theta[:, None, :]


def _chunk(memory: dict[str, Tensor], momentum: dict[str, Tensor], factors: list[tuple[Tensor, Tensor]],
           queries: Tensor, theta: Tensor, eta: Tensor, keep: Tensor
           ) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
    """One chunk: the outputs ``M_t(q_t)`` ``(B, C, Dv)``, the memory and the momentum at its end.

    With ``u_j = -theta_j a_j^T d_j``, Eq. 10 gives ``S_t = E[t, 0] S_0 + sum_j E[t, j+1] u_j`` and
    Eq. 13 ``M_t = A[t, 0] M_0 + sum_j A[t, j+1] S_j`` (``E``, ``A``: :func:`_decay_matrix` of ``eta``
    and ``1 - alpha``); substituting, ``M_t = A[t, 0] M_0 + K[t, 0] S_0 + sum_j K[t, j+1] u_j`` with
    ``K = A[:, 1:] E``.
    """
    momentum_decay, keep_decay, kernel, token_mix = _mixing(theta, eta, keep)
    end_mix, end_momentum_mix = token_mix[:, -1], momentum_decay[:, -1, 1:] * theta
    names = [f"weight_{layer}" for layer in range(len(memory))]
    rows, new_memory, new_momentum = queries, {}, {}  # rows: a layer's input, (B, C, Di)
    for layer, (name, (inputs, signals)) in enumerate(zip(names, factors, strict=True)):
        start, carried = memory[name], momentum[name]  # M_0, S_0: (B, Di, Do)
        # x_t M_t = A[t, 0] x_t M_0 + K[t, 0] x_t S_0 - sum_j K[t, j+1] theta_j (x_t . a_j) d_j   (Eqs. 13, 15)
        rows = (keep_decay[..., :1] * (rows @ start) + kernel[..., :1] * (rows @ carried)
                - (token_mix * (rows @ inputs.mT)) @ signals)
        if layer < len(names) - 1:
            rows = F.silu(rows)
        new_memory[name] = (_per_sequence(keep_decay[:, -1, 0], start) * start  # M at the chunk's end, Eq. 13
                            + _per_sequence(kernel[:, -1, 0], start) * carried
                            - (inputs * end_mix[..., None]).mT @ signals)
        new_momentum[name] = (_per_sequence(momentum_decay[:, -1, 0], start) * carried  # S at the end, Eq. 10
                              - (inputs * end_momentum_mix[..., None]).mT @ signals)
    return rows, new_memory, new_momentum


def _chunk_from_gradients(memory: dict[str, Tensor], momentum: dict[str, Tensor], gradients: list[tuple[Tensor]],
                          queries: Tensor, theta: Tensor, eta: Tensor, keep: Tensor
                          ) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
    """:func:`_chunk` from the per-token gradients ``G_j`` (``(B, C, Di, Do)`` per layer),
    forming every weight ``M_t = A[t, 0] M_0 + K[t, 0] S_0 - sum_j K[t, j+1] theta_j G_j`` and reading
    ``q_t`` through it: ``O(C D^2)`` memory per layer and chunk."""
    momentum_decay, keep_decay, kernel, token_mix = _mixing(theta, eta, keep)
    end_momentum_mix = momentum_decay[:, -1, 1:] * theta
    names = [f"weight_{layer}" for layer in range(len(memory))]
    rows, new_memory, new_momentum = queries, {}, {}
    for layer, (name, (token_grads,)) in enumerate(zip(names, gradients, strict=True)):
        start, carried = memory[name], momentum[name]
        weights = (keep_decay[..., :1, None] * start[:, None] + kernel[..., :1, None] * carried[:, None]
                   - torch.einsum("btj,bjio->btio", token_mix, token_grads))  # every M_t (Eq. 13): (B, C, Di, Do)
        rows = torch.einsum("bti,btio->bto", rows, weights)  # x_t M_t (Eq. 15)
        if layer < len(names) - 1:
            rows = F.silu(rows)
        new_memory[name] = weights[:, -1]
        new_momentum[name] = (_per_sequence(momentum_decay[:, -1, 0], start) * carried  # Eq. 10
                              - torch.einsum("bj,bjio->bio", end_momentum_mix, token_grads))
    return rows, new_memory, new_momentum


# --- the arguments as tensors ------------------------------------------------------------------

def _per_sequence_memory_and_gates(params: dict[str, Tensor], keys: Tensor, theta: Gate, eta: Gate,
                                   alpha: Gate) -> tuple[dict[str, Tensor], Tensor, Tensor, Tensor]:
    """One memory per sequence (weights ``(B, Di, Do)``) and the three gates as tensors ``(B, T)``."""
    memory = {name: weight.expand(keys.shape[0], *weight.shape[-2:]) for name, weight in params.items()}
    gates = (_gate_tensor("theta", theta, None, keys), _gate_tensor("eta", eta, 1, keys),
             _gate_tensor("alpha", alpha, 1, keys))
    return (memory, *gates)


def _gate_tensor(name: str, gate: Gate, high: float | None, keys: Tensor) -> Tensor:
    """A gate as a tensor ``(B, T)``: a tensor as it is (trusted), a number checked (finite, in
    ``[0, high]``) and broadcast, in the keys' dtype and device."""
    if isinstance(gate, Tensor):
        return gate
    return torch.full(keys.shape[:2], check_range(name, gate, 0, high), dtype=keys.dtype, device=keys.device)
