"""``report``: per-layer energies of a model's declared layers, as a table or plain data."""

from __future__ import annotations

from torch import nn
from torch.nn.modules.conv import _ConvNd

from ._declare import declaration, select_layers, unwrap

__all__ = ["Report", "report"]


class Report:
    """Per-layer energies of a model's declared layers (made by :func:`report`).

    ``rows`` is a list of plain dicts (one per layer), with keys: ``name``, ``module``,
    ``case``, ``description``, ``group``, ``rep_in``, ``rep_out`` (strings), ``weight_shape``,
    ``norm_sq`` (||W||^2 + ||b||^2), ``e_perp``, ``e_g``, ``e_perp_bias`` (part of ``e_perp``),
    ``rel_perp`` (E_perp / norm_sq), ``defect_lower`` = sqrt(E_perp) and ``defect_upper`` =
    2 sqrt(E_perp) (docs/math.md §2: sqrt(E_perp) <= sup_g ||rho_out(g) W - W rho_in(g)||_F <= 2 sqrt(E_perp),
    for the layer's full action, kernel grid included; ``None`` for kernel-space layers, where G
    does not act on the whole kernel), ``shares_no_irrep`` (rep_in and rep_out share no irrep, so the
    equivariant part is forced to 0; ``None`` where not applicable), ``breakdown`` (``None``, or a
    list of ``{"irrep_out", "irrep_in", "e_perp"}`` sorted by energy, when requested). ``undeclared``
    lists the model's ``nn.Linear`` / ``nn.Conv*`` layers that are not declared (``name``, ``module``,
    ``weight_shape``): no symmetry is asked of them. ``str(report)`` is a text table; :meth:`as_dict` a
    plain nested dict.
    """

    def __init__(self, rows: list[dict], undeclared: list[dict] | None = None):
        self.rows = rows
        self.undeclared = undeclared or []

    def as_dict(self) -> dict:
        tot_n = sum(r["norm_sq"] for r in self.rows)
        tot_p = sum(r["e_perp"] for r in self.rows)
        return {"layers": [dict(r) for r in self.rows],
                "total": {"norm_sq": tot_n, "e_perp": tot_p, "e_g": sum(r["e_g"] for r in self.rows),
                          "rel_perp": tot_p / tot_n if tot_n > 0 else 0.0},
                "undeclared": [dict(u) for u in self.undeclared]}

    def scalars(self, prefix: str = "equiproj") -> dict[str, float]:
        """``{tag: value}``: per layer ``{prefix}/rel_perp/{name}`` (E_perp/||W||^2), ``{prefix}/e_perp/{name}`` and
        ``{prefix}/e_g/{name}``, and the model's totals under the name ``total``: what a logger records."""
        out = {}
        total = self.as_dict()["total"]
        for name, r in [(r["name"] or "model", r) for r in self.rows] + [("total", total)]:
            for key in ("rel_perp", "e_perp", "e_g"):
                out[f"{prefix}/{key}/{name}"] = float(r[key])
        return out

    def log_to(self, writer, step: int, prefix: str = "equiproj") -> None:
        """Write :meth:`scalars` with ``writer.add_scalar(tag, value, step)`` (a TensorBoard ``SummaryWriter``, or
        anything with that method)."""
        if not callable(getattr(writer, "add_scalar", None)):
            raise TypeError(f"log_to needs a writer with add_scalar(tag, value, step) (e.g. "
                            f"torch.utils.tensorboard.SummaryWriter), got {type(writer).__name__}")
        for tag, value in self.scalars(prefix).items():
            writer.add_scalar(tag, value, step)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]

    def __repr__(self):
        return f"<equiproj Report: {len(self.rows)} layers>"

    def __str__(self):
        head = ["layer", "module", "case", "||W||^2", "E_perp", "E_perp/||W||^2", "sup_g defect <=", "flag"]
        body = []
        for r in self.rows:
            flag = "shares no irrep: equivariant part is 0" if r["shares_no_irrep"] else ""
            body.append([r["name"] or "(model)", r["module"], r["case"], f"{r['norm_sq']:.3e}", f"{r['e_perp']:.3e}",
                         f"{r['rel_perp']:.2e}", "n/a" if r["defect_upper"] is None else f"{r['defect_upper']:.2e}", flag])
        t = self.as_dict()["total"]
        body.append(["total", "", "", f"{t['norm_sq']:.3e}", f"{t['e_perp']:.3e}", f"{t['rel_perp']:.2e}", "", ""])
        widths = [max(len(str(x[j])) for x in [head] + body) for j in range(len(head))]
        fmt = lambda row: "  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip()  # noqa: E731
        lines = [fmt(head), fmt(["-" * w for w in widths])] + [fmt(b) for b in body]
        lines.append("")
        for r in self.rows:
            lines.append(f"{r['name'] or '(model)'}: {r['description']}; {r['rep_in']} -> {r['rep_out']}")
            if r["breakdown"]:
                for e in r["breakdown"]:
                    if e["e_perp"] > 0:
                        share = e["e_perp"] / r["e_perp"] if r["e_perp"] > 0 else 0.0
                        lines.append(f"    {e['irrep_out']} <- {e['irrep_in']}: E_perp {e['e_perp']:.3e} ({share:.1%})")
        for u in self.undeclared:
            lines.append(f"{u['name']}: {u['module']} {u['weight_shape']} is not declared: no symmetry is asked of it")
        lines.append("defect bound: sup_g ||rho_out(g) W - W rho_in(g)||_F <= 2 sqrt(E_perp) (docs/math.md §2)")
        return "\n".join(lines)


def report(model: nn.Module, breakdown: bool = False, layers=None) -> Report:
    """Energies of every declared layer (float64, no gradients): a :class:`Report`.

    ``breakdown=True`` adds, for matrix-form layers, E_perp per (irrep_out, irrep_in) block type
    in the irrep basis of the layer's full action (where the layer breaks the symmetry)."""
    rows = [d.report_row(name, m, breakdown) for name, m, d in select_layers(model, layers)]
    undeclared = [] if layers is not None else [
        {"name": name, "module": type(m).__name__, "weight_shape": tuple(m.weight.shape)}
        for name, m in unwrap(model).named_modules()
        if isinstance(m, (nn.Linear, _ConvNd)) and declaration(m) is None]
    return Report(rows, undeclared)
