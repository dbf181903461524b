"""``results.png``: every implementation's ratio to torch.nn per case, with its confidence interval."""

from typing import List, Sequence

from rnnbench.cases import BASELINE, MODE_TITLE, MODES
from rnnbench.report import case_key


def write_plot(path: str, rows: List[dict], impls: Sequence[str], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    has_ratio = any(r["ratio_vs_torch_nn"] and r["impl"] != BASELINE for r in rows)
    metric = "ratio_vs_torch_nn" if has_ratio else "tokens_per_s"
    lo, hi = ("ratio_ci_lo", "ratio_ci_hi") if has_ratio else ("tokens_per_s_q1", "tokens_per_s_q3")
    plotted = [i for i in impls if not (has_ratio and i == BASELINE)]
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    by_key = {(r["mode"], r["impl"]) + case_key(r): r for r in rows}
    n_cases = len({case_key(r) for r in rows})
    fig, axes = plt.subplots(len(modes), 1, figsize=(max(8.0, 1.1 * n_cases + 2), 4.5 * len(modes)), squeeze=False)
    width = 0.8 / max(1, len(plotted))
    for ax, mode in zip(axes[:, 0], modes):
        cases = list(dict.fromkeys(case_key(r) for r in rows if r["mode"] == mode))
        for j, impl in enumerate(plotted):
            xs, ys, err = [], [], [[], []]
            for x, c in enumerate(cases):
                r = by_key.get((mode, impl) + c)
                if r is None or not r[metric]:
                    continue
                y = float(r[metric])
                xs.append(x + (j - (len(plotted) - 1) / 2) * width)
                ys.append(y)
                err[0].append(max(0.0, y - float(r[lo])))
                err[1].append(max(0.0, float(r[hi]) - y))
            if xs:
                ax.bar(xs, ys, width, yerr=err, capsize=2, label=impl)
        if has_ratio:
            ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.tick_params(axis="y", which="minor", labelsize=6)
        ax.set_ylabel("× torch.nn tokens/s" if has_ratio else "tokens/s")
        ax.set_title(f"{MODE_TITLE[mode]} — {title}", fontsize=9)
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels([f"{c[0]}\n{c[1]}" for c in cases], fontsize=7)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
