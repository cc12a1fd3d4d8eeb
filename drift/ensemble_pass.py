"""The drift loop's ensemble forward pass: features-by-rows layout, reused scratch memory.

The drift signals evaluate an :class:`~fogline.models.predictive.Ensemble` of S
weight samples on every batch (the reference ensemble on all N rows, the
updated posterior's on some of them).  :func:`component_params` computes what
:func:`fogline.models.predictive.component_params` does, the per-sample
predictive parameters (mu [S, N], sigma [S, N]), with the same maths

    h_0 = x^T                                   [D, N]  (shared by every sample)
    h_1 = act(W_1 h_0 + b_1)                    [S, H_1, N]  (one GEMM: W_1 as [S H_1, D])
    h_{l+1} = act(W_{l+1} h_l + b_{l+1})        [S, H_{l+1}, N]  (batched GEMM)
    out = W_L h_{L-1} + b_L                     [S, O, N]
    mu = out[:, 0],  sigma = noise_scale(out[:, 1])   (Bernoulli: p = sigmoid(out[:, 0]))

but laid out so that it is cheaper on a CPU:

- activations are kept as [S, features, N] (rows last), so the stored
  per-sample weights W_l [S, out, in] are used as they are (no transposed
  operands), the first layer is one [S H_1, D] x [D, N] matrix product, and
  the last layer's two outputs come out as contiguous rows (the noise head's
  ``softplus`` runs on contiguous memory instead of a stride-2 slice);
- the hidden activations ([S, H, N], 2 MB each for S = 64, N = 256, H = 32)
  are written into scratch buffers that a :class:`Workspace` keeps from call
  to call (``out=`` and in-place activations).  Fresh tensors of that size
  are fresh pages from the kernel on every batch (about 1,000 page faults
  per batch in the drift loop, measured); reused ones are not.

The results equal ``models.predictive.component_params`` to float rounding
(the products are summed in another order; ~1e-6 relative in float32), not
bit for bit, and they are a deterministic function of the ensemble and the
rows: a fresh workspace and a reused one give the same bits (every buffer is
overwritten in full before it is read), so restarts stay exact.  The
returned tensors never alias the workspace.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F

from fogline.models.network import noise_scale
from fogline.models.predictive import Ensemble


def _gelu_(h: torch.Tensor) -> torch.Tensor:
    return h.copy_(F.gelu(h))


#: In-place activations (the buffer is overwritten by act(buffer)).
_ACTIVATIONS_: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu_,
    "tanh": torch.tanh_,
    "silu": lambda h: F.silu(h, inplace=True),
    "gelu": _gelu_,
}


class Workspace:
    """Scratch buffers for the hidden activations of ensemble passes, reused across calls.

    One flat buffer per slot (two slots, used alternately by consecutive
    hidden layers) and dtype/device, grown when a pass needs more; a pass
    takes a view of its first elements.  Not thread-safe: use one per thread
    (:func:`default_workspace`).
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}

    def take(
        self, slot: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """A contiguous tensor of ``shape`` backed by buffer ``slot`` (contents undefined)."""
        n = 1
        for d in shape:
            n *= d
        key = (slot, dtype, device)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < n:
            buf = torch.empty(n, dtype=dtype, device=device)
            self._buffers[key] = buf
        return buf[:n].view(shape)

    @property
    def nbytes(self) -> int:
        """Memory held by the buffers."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())


#: Hidden activations per layer and chunk of samples (float elements, 1 MB in float32).
#: Measured on the 2-core EPYC VM (S = 64, hidden 32): at N = 256 rows chunks of 32
#: samples beat the whole ensemble at once by ~20 % (the chunk's activations stay in
#: cache from layer to layer) and chunks of 8 or fewer lose to per-call overhead; at
#: N = 64 the whole ensemble in one chunk is best.  The chunk size depends on the
#: shapes only, so it is the same in every process.
CHUNK_ELEMENTS = 1 << 18

_local = threading.local()


def default_workspace() -> Workspace:
    """This thread's workspace (created on first use)."""
    ws: Workspace | None = getattr(_local, "workspace", None)
    if ws is None:
        ws = _local.workspace = Workspace()
    return ws


def chunk_size(ens: Ensemble, rows: int) -> int:
    """Samples per chunk of a pass over ``rows`` rows: about :data:`CHUNK_ELEMENTS`
    hidden activations per layer, at least 1, at most S (a function of the shapes only)."""
    s = ens.size
    widest = max((int(w.shape[1]) for w, _ in ens.layers[:-1]), default=1)
    return max(1, min(s, CHUNK_ELEMENTS // max(1, widest * rows)))


def raw_outputs(
    ens: Ensemble, x_nd: torch.Tensor, workspace: Workspace | None = None
) -> torch.Tensor:
    """The net's raw outputs for every sample, ``[S, O, N]`` (rows last; a fresh tensor).

    ``x_nd`` [N, D] is shared by all samples (see the module docstring).  The
    samples are evaluated in chunks of :func:`chunk_size` (each sample's
    products are independent of the others', so the chunking changes no bit).
    """
    if x_nd.dim() != 2:
        raise ValueError(f"x must be [N, D], got shape {tuple(x_nd.shape)}")
    ws = workspace if workspace is not None else default_workspace()
    weight0, bias0 = ens.layers[0]
    s, h0, d = weight0.shape
    if x_nd.shape[1] != d:
        raise ValueError(f"x has {x_nd.shape[1]} features, the ensemble expects {d}")
    n = int(x_nd.shape[0])
    dtype, device = weight0.dtype, weight0.device
    # x^T as a fresh contiguous copy: the GEMM sees the same operand layout whatever
    # slice of a decoded poll x is (alignment-dependent kernels stay on one path)
    x_t = x_nd.to(dtype).t().contiguous()
    w0 = weight0.reshape(s * h0, d)
    b0 = bias0.reshape(s * h0, 1)
    if len(ens.layers) == 1:
        return torch.addmm(b0, w0, x_t).view(s, h0, n)
    act = _ACTIVATIONS_[ens.config.activation]
    w_last, b_last = ens.layers[-1]
    out = torch.empty(s, int(w_last.shape[1]), n, dtype=dtype, device=device)
    step = chunk_size(ens, n)
    for lo in range(0, s, step):
        hi = min(s, lo + step)
        c = hi - lo
        h = ws.take(0, (c * h0, n), dtype, device)
        torch.addmm(b0[lo * h0 : hi * h0], w0[lo * h0 : hi * h0], x_t, out=h)
        h = act(h.view(c, h0, n))
        for i, (weight, bias) in enumerate(ens.layers[1:-1], start=1):
            nxt = ws.take(i % 2, (c, int(weight.shape[1]), n), dtype, device)
            torch.baddbmm(bias[lo:hi].unsqueeze(2), weight[lo:hi], h, out=nxt)
            h = act(nxt)
        torch.baddbmm(b_last[lo:hi].unsqueeze(2), w_last[lo:hi], h, out=out[lo:hi])
    return out


def component_params(
    ens: Ensemble, x_nd: torch.Tensor, workspace: Workspace | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample predictive parameters for rows ``x_nd`` [N, D], as
    :func:`fogline.models.predictive.component_params`: (mu [S, N], sigma [S, N])
    for Gaussian/Student-t, (p [S, N], zeros) for Bernoulli."""
    with torch.no_grad():
        out = raw_outputs(ens, x_nd, workspace)
        if ens.config.likelihood == "bernoulli":
            p = torch.sigmoid(out[:, 0])
            return p, torch.zeros_like(p)
        return out[:, 0], noise_scale(out[:, 1], ens.config)


__all__ = [
    "CHUNK_ELEMENTS",
    "Workspace",
    "chunk_size",
    "component_params",
    "default_workspace",
    "raw_outputs",
]
