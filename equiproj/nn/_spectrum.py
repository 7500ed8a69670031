"""The symmetry spectrum of a model: each declared layer's relative non-equivariant energy under every
subgroup of its group (docs/math.md §10, docs/tutorial.md)."""

from __future__ import annotations

import torch
from torch import nn

from ..groups import SubgroupLattice
from ._declaration import batches
from ._declare import declared_layers
from ._restrict import as_subgroup
from ._tensors import no_autocast

__all__ = ["symmetry_spectrum", "SymmetrySpectrum"]

#: the row of the model as a whole in ``SymmetrySpectrum.rel_perp``
MODEL_ROW = "(model)"


class SymmetrySpectrum:
    """``E_perp / ||W||^2`` of each declared layer under each subgroup (weight and bias together, as the
    penalty counts them), made by :func:`symmetry_spectrum`.

    Attributes:
        group: the declared group G.
        subgroups: the :class:`~equiproj.groups.Subgroup` objects, smallest first (G last).
        lattice: ``G.subgroups()`` (its inclusions; the Hasse diagram of :meth:`plot`).
        layers: the layer names.
        e_perp: ``[layers, subgroups]`` float64 tensor of ``E_perp^H``.
        norm_sq: ``[layers]`` float64 tensor of ``||W||^2 + ||b||^2``.
        rel_perp: ``{layer: {subgroup name: E_perp / ||W||^2}}``, plus the row ``"(model)"``: the sum
            of the energies over the sum of the squared norms (layers weighted by ``||W||^2``).

    Since ``Hom_G ⊂ Hom_H`` for ``H ⊂ G``, every row decreases from G down the lattice; subgroups whose
    value stays near 0 are the symmetries the weights keep.
    """

    def __init__(self, group, lattice, subgroups, layers, e_perp, norm_sq):
        self.group, self.lattice, self.subgroups = group, lattice, tuple(subgroups)
        self.layers = tuple(layers)
        self.e_perp, self.norm_sq = e_perp, norm_sq
        rel = e_perp / norm_sq.clamp_min(torch.finfo(torch.float64).tiny)[:, None]
        names = [s.name for s in self.subgroups]
        self.rel_perp = {layer: dict(zip(names, map(float, rel[i]))) for i, layer in enumerate(self.layers)}
        total = float(norm_sq.sum())
        model = e_perp.sum(0) / total if total > 0 else torch.zeros(len(names), dtype=torch.float64)
        self.rel_perp[MODEL_ROW] = dict(zip(names, map(float, model)))

    @property
    def model(self) -> dict[str, float]:
        """The model-level row: ``sum_layers E_perp^H / sum_layers ||W||^2`` per subgroup."""
        return self.rel_perp[MODEL_ROW]

    def kept(self, threshold: float) -> list[str]:
        """The subgroups whose model-level value is at most ``threshold``, smallest first."""
        return [name for name, v in self.model.items() if v <= threshold]

    def table(self, layers: bool = True) -> str:
        """The spectrum as text: one column per subgroup, one row per layer and the model row."""
        names = [s.name for s in self.subgroups]
        rows = (list(self.layers) if layers else []) + [MODEL_ROW]
        w0 = max(len(r) for r in rows)
        w = max(9, max(len(n) for n in names))
        lines = [" " * w0 + "  " + "  ".join(n.rjust(w) for n in names)]
        for r in rows:
            lines.append(r.ljust(w0) + "  " + "  ".join(f"{self.rel_perp[r][n]:{w}.2e}" for n in names))
        return "\n".join(lines)

    def __str__(self):
        return f"symmetry spectrum of {self.group!r}: E_perp / ||W||^2 per layer and subgroup\n{self.table()}"

    def __repr__(self):
        return f"SymmetrySpectrum({self.group!r}, {len(self.layers)} layers, {len(self.subgroups)} subgroups)"

    def plot(self, path, title: str | None = None, floor: float = 1e-12):
        """Save the lattice as a Hasse diagram coloured by the model-level value (log scale) next to a
        per-layer heatmap. Needs matplotlib (``pip install matplotlib``)."""
        try:
            import matplotlib  # noqa: PLC0415 - optional dependency, imported on use

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt  # noqa: PLC0415
        except ImportError as e:
            raise ImportError("SymmetrySpectrum.plot needs matplotlib: pip install matplotlib") from e
        names = [s.name for s in self.subgroups]
        model = torch.tensor([self.model[n] for n in names]).clamp_min(floor).log10()
        table = torch.tensor([[self.rel_perp[r][n] for n in names] for r in self.layers]).clamp_min(floor).log10()
        lo, hi = float(min(model.min(), table.min())), float(max(model.max(), table.max()))
        hi = max(hi, lo + 1e-9)
        cmap = plt.get_cmap("viridis")
        pos = _hasse_layout(self.lattice, names)
        width = max(x for x, _ in pos.values()) + 0.5
        levels = max(y for _, y in pos.values()) + 1
        if width <= 8:  # side by side
            fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(13, 5.5), gridspec_kw={"width_ratios": [1.1, 1]})
        else:  # a large lattice (O_h's 35 subgroups): about an inch per node, the heatmap below it
            heat = 1.5 + 0.3 * len(self.layers)
            fig, (ax0, ax1) = plt.subplots(2, 1, figsize=(1.05 * width + 1, 1.1 * levels + heat + 1.5),
                                           gridspec_kw={"height_ratios": [1.1 * levels, heat]})
        for a, b in self.lattice.covers():
            if a.name in pos and b.name in pos:
                (x0, y0), (x1, y1) = pos[a.name], pos[b.name]
                ax0.plot([x0, x1], [y0, y1], color="0.6", lw=1, zorder=1)
        for n, v in zip(names, model.tolist()):
            x, y = pos[n]
            ax0.scatter([x], [y], s=1400, color=cmap((v - lo) / (hi - lo)), edgecolor="k", zorder=2)
            ax0.annotate(f"{n}\n{self.model[n]:.1e}", (x, y), ha="center", va="center", fontsize=7 if len(n) < 9 else 6,
                         zorder=3,
                         color="w" if (v - lo) / (hi - lo) < 0.5 else "k")
        ax0.set_axis_off()
        ax0.set_title("subgroup lattice, model-level E_perp/||W||^2")
        im = ax1.imshow(table.numpy(), aspect="auto", cmap=cmap, vmin=lo, vmax=hi)
        ax1.set_xticks(range(len(names)), names, rotation=60, fontsize=7)
        ax1.set_yticks(range(len(self.layers)), self.layers, fontsize=7)
        ax1.set_title("per layer, log10 E_perp/||W||^2")
        fig.colorbar(im, ax=ax1, fraction=0.04)
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def _hasse_layout(lattice, names) -> dict[str, tuple[float, float]]:
    """Rank = the longest chain below a subgroup (among ``names``); nodes of one rank side by side."""
    subs = [lattice[n] for n in names]
    rank: dict[str, int] = {}
    for s in subs:  # subgroups are ordered smallest first, so everything below is ranked already
        below = [rank[t.name] for t in subs if t.name in rank and t.name != s.name and lattice.includes(t, s)]
        rank[s.name] = 1 + max(below, default=-1)
    levels: dict[int, list[str]] = {}
    for n in names:
        levels.setdefault(rank[n], []).append(n)
    width = max(len(v) for v in levels.values())
    below = {n: [] for n in names}
    for a, b in lattice.covers():
        if a.name in below and b.name in below:
            below[b.name].append(a.name)
    pos: dict[str, tuple[float, float]] = {}
    for r in sorted(levels):
        level = levels[r]
        if r:  # each node above the mean position of those it covers: fewer crossing edges
            level.sort(key=lambda n: sum(pos[m][0] for m in below[n]) / len(below[n]) if below[n] else width / 2)
        pos.update({n: ((i + 0.5) * width / len(level), float(r)) for i, n in enumerate(level)})
    return pos


def symmetry_spectrum(model: nn.Module, subgroups=None) -> SymmetrySpectrum:
    """``E_perp / ||W||^2`` of every declared layer under every subgroup of the declared group.

    Args:
        model: a model whose layers are declared under one group G (translation layers are left out).
        subgroups: names, :class:`~equiproj.groups.Subgroup` objects or groups, or a lattice such as
            ``G.subgroups(conjugates=True)`` (every subgroup of a finite G, conjugates apart: the mirrors
            x -> -x and y -> -y are different symmetries of a trained model); default: all of
            ``G.subgroups()`` (G included). The lattice of :meth:`SymmetrySpectrum.plot` is the one given,
            ``G.subgroups()`` when every subgroup is listed there, else the lattice of the subgroups given.

    Each subgroup costs one call per kind of layer (one fused ``energies_many`` over all matrix-form
    layers), in float64 without gradients.

    Example::

        >>> import torch, equiproj
        >>> from equiproj.nn import declare, project_, symmetry_spectrum
        >>> D4 = equiproj.Dihedral(4)
        >>> model = torch.nn.Sequential(declare(torch.nn.Linear(8, 8), D4.regular(), D4.regular()))
        >>> _ = project_(model, subgroup="C4")           # C4-equivariant, not D4-equivariant
        >>> spectrum = symmetry_spectrum(model)
        >>> spectrum.model["C4"] < 1e-10 < 1e-2 < spectrum.model["D4"]    # float32 weights
        True
        >>> spectrum.rel_perp["0"]["C2"] < 1e-10            # every subgroup of C4 too
        True
    """
    layers = [(n, m, d) for n, m, d in declared_layers(model) if d.group is not None]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no layers declared under a group: nothing to measure")
    groups = {d.group for _, _, d in layers}
    if len(groups) > 1:
        raise ValueError(f"the declared layers use different groups ({', '.join(map(repr, groups))}): the spectrum "
                         "compares subgroups of one group")
    (G,) = groups
    lattice = G.subgroups()
    if isinstance(subgroups, SubgroupLattice):
        if subgroups.parent != G:
            raise ValueError(f"the subgroups given are those of {subgroups.parent!r}, the layers are declared under {G!r}")
        lattice = subgroups
    subs = list(lattice) if subgroups is None or subgroups is lattice else [as_subgroup(G, h) for h in subgroups]
    if any(s.name not in lattice or lattice[s.name].group != s.group for s in subs):
        lattice = SubgroupLattice(G, [s for i, s in enumerate(subs) if s not in subs[:i]])  # names must be unique
    names = [n for n, _, _ in layers]
    e_perp = torch.zeros(len(layers), len(subs), dtype=torch.float64)
    norm_sq = torch.zeros(len(layers), dtype=torch.float64)
    with torch.no_grad(), no_autocast(layers[0][1].weight.device):
        for j, H in enumerate(subs):
            per_layer = []
            for name, m, d in layers:
                terms = (d if H.group == G else d.restricted(H)).terms(name, m)
                for t in terms:
                    t.weight = t.weight.detach().double()
                per_layer.append(terms)
            if j == 0:
                for i, terms in enumerate(per_layer):
                    norm_sq[i] = sum(float(t.weight.square().sum()) for t in terms)
            for terms, owners in batches(per_layer).values():
                ep, _ = type(terms[0]).energies(terms)
                e_perp[:, j].index_add_(0, torch.tensor(owners), ep.detach().cpu().to(torch.float64))
    return SymmetrySpectrum(G, lattice, subs, names, e_perp.clamp_min(0.0), norm_sq)
