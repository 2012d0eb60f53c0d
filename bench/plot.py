"""The report's figure: speedup over the baseline and peak memory against sequence length, one column per op.

`draw(panels, path, title)` with panels from `report.plot_panels`; matplotlib's Agg backend,
so it runs without a display.
"""

from __future__ import annotations


def draw(panels: list, path: str, title: str) -> None:
    """Write a PNG: row 1 speedup over each panel's baseline, row 2 peak MiB, both log-scaled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    figure, axes = plt.subplots(2, len(panels), figsize=(3.3 * len(panels), 6.4), squeeze=False)
    for column, (panel_title, baseline, x_label, lines) in enumerate(panels):
        speed_axis, memory_axis = axes[0][column], axes[1][column]
        for provider, points in lines.items():
            speed = [(x, s) for x, s, _ in points if s]
            memory = [(x, m) for x, _, m in points if m]
            if speed:
                speed_axis.plot(*zip(*speed), marker="o", label=provider)
            if memory:
                memory_axis.plot(*zip(*memory), marker="o", label=provider)
        speed_axis.set_title(panel_title, fontsize=9)
        speed_axis.set_ylabel(f"speedup over {baseline}", fontsize=8)
        memory_axis.set_ylabel("peak MiB", fontsize=8)
        memory_axis.set_xlabel(x_label, fontsize=8)
        for axis in (speed_axis, memory_axis):
            axis.set_xscale("log", base=2)
            axis.set_yscale("log")
            axis.xaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
            axis.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0), numticks=8))
            axis.yaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
            low, high = axis.get_ylim()
            narrow = high / max(low, 1e-30) < 10  # less than a decade: label the minor ticks too
            axis.yaxis.set_minor_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}") if narrow
                                           else ticker.NullFormatter())
            axis.tick_params(which="both", labelsize=7)
            axis.grid(True, alpha=0.3)
        speed_axis.legend(fontsize=7)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
