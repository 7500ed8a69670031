"""The PNG of ``equiproj bench --plot`` (needs matplotlib)."""

from __future__ import annotations



from ._report import ratio_text, time_text
from ._timing import is_noisy


def check_plot_available() -> None:
    """Raise ``RuntimeError`` with install instructions when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise RuntimeError("--plot needs matplotlib, which is not installed: pip install matplotlib "
                           "(or pip install 'equiproj[plot]')") from None


#: colour and legend label of each kind of method in the plot, by the method's leading words
_PLOT_KINDS = (("fused", "tab:green", "exact, fused kernel"), ("torch", "tab:blue", "exact, pure torch"),
               ("floor", "tab:gray", "floor: read + write W"), ("dense", "tab:orange", "dense projector"),
               ("sampled", "tab:red", "sample-based @1% RMS error"))


def _plot_kind(method: str) -> tuple[str, str]:
    return next(((c, label) for prefix, c, label in _PLOT_KINDS if method.startswith(prefix)), ("tab:blue", "exact"))


def _extrapolated(r: dict) -> bool:
    """Whether the time of a row was extrapolated or scaled rather than measured."""
    return r.get("time_how", "measured") != "measured"


def write_plot(result: dict, path: str) -> None:
    """A PNG of the timing table: one panel per layer, one bar per method, on one log time axis
    shared by all panels; the time on each bar (``extrapolated`` / ``noisy`` where so), the
    interquartile range as a whisker, a legend of the kinds of method, and the machine and mode in
    the title."""
    check_plot_available()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.ticker import LogLocator

    by_layer: dict[str, list] = {}
    for r in result["timings"]:
        if "median_s" in r:
            by_layer.setdefault(r["title"], []).append(r)
    n = max(1, len(by_layer))
    heights = [max(2, len(rows)) for rows in by_layer.values()] or [2]
    fig, axes = plt.subplots(n, 1, figsize=(10, 0.32 * sum(heights) + 0.9 * n + 1.6), sharex=True, squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    values = [r["median_s"] for rows in by_layer.values() for r in rows] or [1e-3]
    lo, hi = min(values), max(max(values), max(r["q3_s"] for rows in by_layer.values() for r in rows) if by_layer else 1)
    for ax, (title, rows) in zip(axes[:, 0], by_layer.items()):
        y = range(len(rows))
        vals = [r["median_s"] for r in rows]
        ax.barh(y, vals, color=[_plot_kind(r["method"])[0] for r in rows],
                hatch=["//" if _extrapolated(r) else "" for r in rows], edgecolor="white", linewidth=0.5)
        ax.errorbar(vals, y, xerr=[[v - r["q1_s"] for v, r in zip(vals, rows)], [r["q3_s"] - v for v, r in zip(vals, rows)]],
                    fmt="none", ecolor="black", elinewidth=0.8, capsize=2)
        for yi, r in zip(y, rows):
            marks = [m for m, on in (("extrapolated", _extrapolated(r)), ("noisy", is_noisy(r))) if on]
            shown = r.get("ratio_vs_fused") not in (None, 1.0) and not r.get("ratio_noisy")
            parts = ([ratio_text(r)] if shown else []) + marks
            label = time_text(r["median_s"]) + (f" ({', '.join(parts)})" if parts else "")
            ax.text(max(r["median_s"], r["q3_s"]) * 1.15, yi, label, va="center", fontsize=7)
        ax.set_yticks(list(y), [r["method"] for r in rows], fontsize=7)
        ax.invert_yaxis()
        ax.set_title(title + (f" ({rows[0]['group']})" if rows[0].get("group") else ""), fontsize=9, loc="left")
        ax.grid(axis="x", which="major", linewidth=0.4, alpha=0.5)
    ax0 = axes[0, 0]
    ax0.set_xscale("log")
    ax0.set_xlim(lo / 3, hi * 100)  # room on the right for the labels
    ax0.xaxis.set_major_locator(LogLocator(base=10, numticks=30))
    axes[-1, 0].set_xlabel("time per call: E_perp and its gradient (seconds, log scale; whisker: interquartile range; "
                           "in brackets: time / time of the fastest fused kernel on the layer, as in the report)", fontsize=8)
    for ax in axes[:, 0]:
        ax.tick_params(axis="x", labelsize=7, labelbottom=True)
    kinds = {label: c for r in result["timings"] if "median_s" in r for c, label in [_plot_kind(r["method"])]}
    handles = [Patch(color=c, label=label) for label, c in kinds.items()]
    if any(_extrapolated(r) for rows in by_layer.values() for r in rows):
        handles.append(Patch(facecolor="white", hatch="///", edgecolor="dimgray", label="time extrapolated, not measured"))
    m = result.get("machine", {})
    mode = result.get("settings", {}).get("mode", "?")
    fig.suptitle(f"equiproj bench, {mode} mode: {m.get('processor', '?')}, {m.get('cpu_count', '?')} CPUs, "
                 f"torch {m.get('torch', '?')} ({m.get('torch_threads', '?')} threads), device {m.get('device', '?')}"
                 + (f" ({m['gpu']})" if "gpu" in m else ""), fontsize=10)
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 1 - 0.4 / fig.get_figheight()),
               ncol=min(3, len(handles)), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.7 / fig.get_figheight()))
    fig.savefig(path, dpi=120)
    plt.close(fig)
