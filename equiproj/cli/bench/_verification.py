"""What ``equiproj bench`` verifies before it times: every backend on every suite layer and
``energies_many`` against the float64 reference, and the dense projector."""

from __future__ import annotations


import torch

from ..._energy import energies_many
from ._suite import Settings, rel_error
from ._timing import error_text


def verify_layer(layer, backends: list[str], settings: Settings, gen: torch.Generator) -> list[dict]:
    """Rows ``{layer, method, dtype, rel_err_perp, rel_err_G, rel_err_near}`` for the exact methods and
    the dense projector on ``layer.verification_layer()``, against the float64 reference."""
    L = layer.verification_layer()
    dev = settings.device
    W64 = torch.randn((2,) + L.shape, dtype=torch.float64, generator=gen)  # batched: two weights
    rp, rg = L.reference(W64)
    Wn = L.nearly_equivariant(W64[0], 1e-7, gen).float()
    rn = L.reference(Wn)[0]
    rows = []
    for b in backends:
        for dt in (torch.float32, torch.float64):
            W = W64.to(dt)
            try:
                ep, eg = L.energies(W.to(dev), b)
                rpd, rgd = (rp, rg) if dt == torch.float64 else L.reference(W)
                row = {"method": b, "dtype": str(dt).replace("torch.", ""),
                       "rel_err_perp": rel_error(ep.detach().cpu(), rpd), "rel_err_G": rel_error(eg.detach().cpu(), rgd)}
                if dt == torch.float32:
                    row["rel_err_near"] = rel_error(L.energies(Wn.to(dev), b)[0].detach().cpu(), rn)
            except Exception as e:  # noqa: BLE001
                row = {"method": b, "dtype": str(dt).replace("torch.", ""), "error": error_text(e, 200)}
            rows.append(row)
    for r in rows:
        r["verified_shape"] = list(L.shape)
    if L is not layer:  # full size: float32 against the float64 torch path (itself verified above)
        Wf = torch.randn(layer.shape, generator=gen).to(dev)
        rp32, rg32 = (e.cpu() for e in layer.energies(Wf.double(), "torch"))
        for b in backends:
            try:
                ep, eg = layer.energies(Wf, b)
                rows.append({"method": f"{b} (vs torch float64)", "dtype": "float32", "verified_shape": list(layer.shape),
                             "rel_err_perp": rel_error(ep.detach().cpu(), rp32), "rel_err_G": rel_error(eg.detach().cpu(), rg32)})
            except Exception as e:  # noqa: BLE001
                rows.append({"method": f"{b} (vs torch float64)", "dtype": "float32", "verified_shape": list(layer.shape),
                             "error": error_text(e, 200)})
    # the dense projector (float64), on a layer small enough for a float64 basis
    Ld = layer.dense_check_layer()
    Wd = W64 if Ld is L else torch.randn((2,) + Ld.shape, dtype=torch.float64, generator=gen)
    rpd, rgd = (rp, rg) if Ld is L else Ld.reference(Wd)
    try:
        d = Ld.dense(torch.float64, "cpu", max_bytes=settings.dense_max_bytes)
        ep, eg = Ld.dense_energies(d, Wd)
        rows.append({"method": "dense", "dtype": "float64", "rel_err_perp": rel_error(ep, rpd), "rel_err_G": rel_error(eg, rgd),
                     "verified_shape": list(Ld.shape)})
    except MemoryError as e:
        rows.append({"method": "dense", "dtype": "float64", "error": str(e), "verified_shape": list(Ld.shape)})
    for r in rows:
        r["layer"] = layer.key
    return rows


def verify_many(layers, backends: list[str], settings: Settings, gen: torch.Generator) -> list[dict]:
    """``energies_many`` (the multi-layer entry point) on all linear suite layers at once (their
    verification sizes), float32, against the per-layer float64 reference."""
    if not layers:
        return []
    Ls = [L.verification_layer() for L in layers]
    Ws = [torch.randn(L.shape, generator=gen) for L in Ls]
    refs = [L.reference(W) for L, W in zip(Ls, Ws)]
    rp, rg = torch.stack([r[0] for r in refs]), torch.stack([r[1] for r in refs])
    rows = []
    for b in backends:
        try:
            ep, eg = energies_many([W.to(settings.device) for W in Ws], [(L.rep_in, L.rep_out) for L in Ls], backend=b)
            rows.append({"method": b, "dtype": "float32", "rel_err_perp": rel_error(ep.detach().cpu(), rp),
                         "rel_err_G": rel_error(eg.detach().cpu(), rg)})
        except Exception as e:  # noqa: BLE001
            rows.append({"method": b, "dtype": "float32", "error": error_text(e, 200)})
    for r in rows:
        r["layer"] = "energies_many(" + ", ".join(L.key for L in layers) + ")"
        r["verified_shape"] = [len(Ls)]
    return rows


def verification_ok(r) -> bool:
    if "error" in r:
        return r["method"] == "dense"  # a dense basis that does not fit is not a failure
    tol = 1e-9 if r["dtype"] == "float64" else 1e-4
    ok = r["rel_err_perp"] <= tol and r["rel_err_G"] <= tol
    return ok and r.get("rel_err_near", 0.0) <= 1e-3
