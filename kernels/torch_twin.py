"""Pure-torch twin of the fused kernels: the same contract on any device, and the library's ``"torch"`` backend.

It executes a :class:`~equiproj._plan.PackedPlan` field pair by field pair with batched einsums,
so it is a readable statement of what the C++ and Triton kernels compute, their tests' second
oracle, and the path that runs where no kernel does (float64 on CUDA, other devices, a missing
build). Per field pair, with the pair's orthonormal basis ``A [r, d_out, d_in]`` and each tile
``T`` (one copy of the output field by one copy of the input field, structured coordinates)::

    coef_k = <A_k, T>        R = T - sum_k coef_k A_k        E_perp += ||R||^2        E_G += ||coef||^2

and, for an orbit pair (two permutation fields, no basis: docs/math.md §9), with the orbit ``o(a, b)``
of each entry and the orbit sizes ``n_k`` within a tile::

    S_k = sum_{o(a,b)=k} T[a, b]      R = T - (S / n)[o]      E_perp += ||R||^2      E_G += sum_k S_k^2 / n_k

(for two monomial fields, ``OrbitForm.SIGNED``, each entry taken with its sign ``c(a, b)``:
``S_k = sum c T``, ``R = T - c (S / n)[o]``), or, for a pair stored by the group's permutations (``OrbitForm.POINTS``), the same mean as
``P(T)[a, b] = (1/|G|) sum_g T[sigma_g(a), sigma_g(b)]`` and ``E_G = ||P(T)||^2``.

Unlike the kernels it is plain differentiable torch: energies-only calls keep the autograd graph
(double backward works), and :func:`torch_project` returns ``P(W)`` or ``W - P(W)`` with gradients.
Both run with autocast off for their device, so a ``torch.autocast`` region around the call changes
nothing. Their backward is that autograd graph, which runs in the dtypes of the forward when
``backward()`` is called outside the region (as torch recommends); a backward inside the region,
or one compiled under it (torch's ``backward_pass_autocast="same_as_forward"``), is lowered to
the region's dtype (relative errors 1e-3 to 1e-2 in bfloat16). The fused kernels' backward is the kernel
itself and has no such caveat.
"""

from __future__ import annotations

import torch

from equiproj._plan import OrbitForm, PackedPlan

from .inputs import accumulation_dtype, autocast_off, check_inputs

__all__ = ["torch_fused_energies", "torch_project"]


def _pairs(X: torch.Tensor, P: PackedPlan):
    """``(rows, cols, T, coef, PT)`` per field pair of the structured weight ``X [..., m, n]``:
    the tiles ``T [..., co, do, ci, di]``, their coefficients ``[..., co, ci, r]`` and projection
    (``None`` for r = 0: the whole tile is non-equivariant)."""
    batch = X.shape[:-2]
    for p, A in zip(P.rows(), P.pair_bases(X.device, X.dtype)):
        rows = slice(p.out_offset, p.out_offset + p.out_copies * p.d_out)
        cols = slice(p.in_offset, p.in_offset + p.in_copies * p.d_in)
        T = X[..., rows, cols].reshape(batch + (p.out_copies, p.d_out, p.in_copies, p.d_in))
        if p.orbits and p.orbit_form == OrbitForm.POINTS:  # P(T)[a, b] = mean over g of T[sigma_g a, sigma_g b]
            so, si = P.point_tables(p, X.device)
            PT = sum(T.index_select(-3, so[g]).index_select(-1, si[g]) for g in range(so.shape[0])) / so.shape[0]
            # ||P(T)||^2 = E_G: the projection itself serves as the coefficients
            yield rows, cols, T, PT.transpose(-3, -2).reshape(batch + (p.out_copies, p.in_copies, -1)), PT
        elif p.orbits:  # orbit pair: P(T) is the (signed) mean of T over each orbit, coef_k = S_k / sqrt(n_k)
            o, inv, sign = P.orbit_index(p, X.device)
            inv = inv.to(X.dtype)
            flat = T.transpose(-3, -2).reshape(batch + (p.out_copies, p.in_copies, p.d_out * p.d_in))
            if sign is not None:  # S_k = sum of c(e) T[e] over the orbit, P(T)[e] = c(e) S_k / n_k
                sign = sign.to(X.dtype)
                flat = flat * sign
            S = flat.new_zeros(flat.shape[:-1] + (len(inv),)).index_add(-1, o, flat)
            mean = (S * inv)[..., o]
            if sign is not None:
                mean = mean * sign
            mean = mean.reshape(batch + (p.out_copies, p.in_copies, p.d_out, p.d_in)).transpose(-3, -2)
            yield rows, cols, T, S * inv.sqrt(), mean
        elif p.rank:
            coef = torch.einsum("...uavb,kab->...uvk", T, A)
            yield rows, cols, T, coef, torch.einsum("...uvk,kab->...uavb", coef, A)
        else:
            yield rows, cols, T, None, None


def _structured(W: torch.Tensor, P: PackedPlan, cd: torch.dtype) -> torch.Tensor:
    X = W.to(cd)
    perms = P.permutations(W.device)
    if perms is not None:
        X = X.index_select(-2, perms[0]).index_select(-1, perms[1])
    return X


def _to_user(X: torch.Tensor, P: PackedPlan) -> torch.Tensor:
    perms = P.permutations(X.device)
    return X if perms is None else X.index_select(-2, perms[2]).index_select(-1, perms[3])


def torch_fused_energies(weights, plans, lambda_perp=None, lambda_G=None):
    """Energies (and optionally gradients) of many layers from their packed plans, in pure torch.

    Args:
        weights: L tensors, the i-th ``[..., m_i, n_i]`` (any strides; leading dims are a batch),
            float16 / bfloat16 / float32 (energies in float32) or float64 (energies in float64).
        plans: L :class:`~equiproj._plan.PackedPlan` (basis float32 or float64), the i-th for
            ``W_i``'s (rep_in, rep_out).
        lambda_perp, lambda_G: ``[L]`` coefficients of the penalty ``sum_i c_perp_i E_perp_i + c_g_i E_G_i``,
            or both ``None`` for no gradients.
    Returns:
        ``(e_perp, e_g, grads)``: lists of L tensors ``[...]`` (energy per matrix), and
        ``grads[i] = 2 c_perp_i (W_i - P W_i) + 2 c_g_i P W_i`` ``[..., m_i, n_i]`` in W_i's dtype
        (``None`` without coefficients). Without coefficients the energies are differentiable
        (the autograd graph of the einsums); with them everything is detached.

    Example::

        >>> G = equiproj.SO3(); r = equiproj.Rep.parse(G, "2x0 + 1")
        >>> P = block_plan(r, r).packed("cpu", torch.float32)
        >>> (ep,), (eg,), (g,) = torch_fused_energies([torch.randn(5, 5)], [P], torch.ones(1), torch.zeros(1))
    """
    weights, plans, lambda_perp, lambda_G = check_inputs(weights, plans, lambda_perp, lambda_G, allow_float64=True)
    want_grad = lambda_perp is not None
    e_perp, e_g, grads = [], [], []
    for i, (W, P) in enumerate(zip(weights, plans)):
        with autocast_off(W.device):  # the contract's dtypes inside an autocast region too
            cd = accumulation_dtype(W.dtype)
            X = _structured(W.detach() if want_grad else W, P, cd)
            batch = X.shape[:-2]
            # zeros that depend on X: a weight that requires grad gets a graph even where nothing adds to it
            # (a pair of reps without equivariant maps has E_G = 0, with gradient 0)
            ep = eg = X[..., :0, :0].sum((-2, -1))  # an empty sum: +0, NaN-free
            if want_grad:
                cp2 = 2 * lambda_perp[i].to(device=W.device, dtype=cd)
                cg2 = 2 * lambda_G[i].to(device=W.device, dtype=cd)
                Gs = torch.empty_like(X)
            for rows, cols, T, coef, PT in _pairs(X, P):
                R = T if PT is None else T - PT
                ep = ep + R.square().sum((-4, -3, -2, -1))
                if coef is not None:
                    eg = eg + coef.square().sum((-3, -2, -1))
                if want_grad:
                    g = cp2 * R if PT is None else cp2 * R + cg2 * PT
                    Gs[..., rows, cols] = g.reshape(batch + (rows.stop - rows.start, cols.stop - cols.start))
            e_perp.append(ep)
            e_g.append(eg)
            if want_grad:
                grads.append(_to_user(Gs, P).to(W.dtype))
    return e_perp, e_g, (grads if want_grad else None)


def torch_project(W: torch.Tensor, plan: PackedPlan, which: str = "equivariant") -> torch.Tensor:
    """``P(W)`` (``which="equivariant"``) or ``W - P(W)`` (``"non_equivariant"``, in residual form),
    ``[..., m, n]`` in the compute dtype (float32, float64 for float64 weights); differentiable."""
    if which not in ("equivariant", "non_equivariant"):
        raise ValueError(f"which must be 'equivariant' or 'non_equivariant', got {which!r}")
    with autocast_off(W.device):  # W's accumulation dtype inside an autocast region too
        X = _structured(W, plan, accumulation_dtype(W.dtype))
        batch = X.shape[:-2]
        blocks = []
        for rows, cols, T, coef, PT in _pairs(X, plan):
            if which == "equivariant":
                out = T.new_zeros(()).expand_as(T) + T[..., :0].sum() if PT is None else PT  # zeros on T's graph
            else:
                out = T if PT is None else T - PT
            blocks.append((rows, cols, out.reshape(batch + (rows.stop - rows.start, cols.stop - cols.start))))
        # the field pairs tile the matrix: assemble row by row (differentiable, no in-place writes)
        by_row: dict = {}
        for rows, cols, out in blocks:
            by_row.setdefault((rows.start, rows.stop), []).append((cols.start, out))
        row_blocks = [torch.cat([o for _, o in sorted(parts, key=lambda t: t[0])], dim=-1)
                      for _, parts in sorted(by_row.items())]
        Y = torch.cat(row_blocks, dim=-2) if row_blocks else X * 0
        return _to_user(Y, plan)
