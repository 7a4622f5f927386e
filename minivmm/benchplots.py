"""PNG plots for ``minivmm bench``'s report (needs matplotlib: the ``plots`` extra).

Importing this module fails without matplotlib; ``minivmm/benchsuite.py``
then says in the report that the plots were skipped.  Plots only figures the
suites measured (medians; error bars from min to max)."""

from __future__ import annotations

import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")               # files only, no display
import matplotlib.pyplot as plt     # noqa: E402
from matplotlib.ticker import MaxNLocator   # noqa: E402


def _med(values):
    return statistics.median(values)


def _err(*series):
    """Error bars from min to max around the median, one per series."""
    return [[_med(v) - min(v) for v in series], [max(v) - _med(v) for v in series]]


def _save(fig, out: Path, name: str, made: list) -> None:
    fig.tight_layout()
    fig.savefig(out / name, dpi=90)
    plt.close(fig)
    made.append(name)


def _downtime_and_total(out: Path, made: list, name: str, title: str, xlabel: str, draw) -> None:
    """Downtime and total time side by side, plain and secure in each;
    ``draw(ax, what, kind)`` plots one mode's line of one panel."""
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.3))
    for ax, what in zip(axes, ("downtime", "total")):
        for kind in ("plain", "secure"):
            draw(ax, what, kind)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{what} (ms)")
        ax.legend()
    fig.suptitle(title)
    _save(fig, out, name, made)


def plot_all(out: Path, sections: list[dict]) -> list[str]:
    made: list[str] = []
    mig = next((s for s in sections if s["name"] == "migration"), None)
    if mig is None:
        return made
    f = mig["figures"]
    # Throughput against the ceilings measured in the same run.
    bars = [(k, label) for k, label in (("ceiling_loopback_MBps", "loopback TCP"), ("ceiling_aes_gcm_MBps", "AES-256-GCM"),
                                        ("ceiling_memcpy_MBps", "memory copy"),
                                        ("ceiling_datapath_plain_MBps", "data path, plain"),
                                        ("full_plain_MBps", "migration, plain"),
                                        ("ceiling_datapath_secure_MBps", "data path, secure"),
                                        ("full_secure_MBps", "migration, secure")) if k in f]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    for i, (k, label) in enumerate(bars):
        ax.bar(i, _med(f[k]), yerr=_err(f[k]), color="tab:gray" if k.startswith("ceiling") else "tab:blue")
    if "ceiling_loopback_MBps" in f:        # issue 16's goal: half the wire
        ax.axhline(_med(f["ceiling_loopback_MBps"]) / 2, color="tab:red", linestyle="--", linewidth=1,
                   label="50 % of loopback (the goal)")
        ax.legend(loc="upper right", fontsize="small")
    ax.set_xticks(range(len(bars)), [label for _, label in bars], rotation=20, ha="right")
    ax.set_ylabel("MB/s (median, min-max)")
    ax.set_title(f"{mig['params']['full_ram_mib']} MiB full-RAM guest vs ceilings (same run)")
    _save(fig, out, "throughput.png", made)
    # Pages sent and dirtied per pre-copy round.
    rounds = mig["series"].get("rounds", {})
    if rounds:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        for name, rs in rounds.items():
            x = [r["round"] for r in rs]
            ax.plot(x, [r["sent"] for r in rs], marker="o", label=f"{name}: sent")
            ax.plot(x, [r["dirtied"] for r in rs], marker="x", linestyle="--", label=f"{name}: dirtied")
        ax.set_xlabel("round (last: stop-and-copy)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))      # rounds are whole
        ax.set_ylabel("pages")
        ax.set_yscale("symlog")
        ax.legend(fontsize=6)
        ax.set_title("pages sent and dirtied per pre-copy round (first run)")
        _save(fig, out, "rounds.png", made)
    # Downtime and total time against RAM size, plain and secure.
    sizes = mig["series"]["by_size"]["sizes_mib"]

    def by_size(ax, what, kind):
        keys = [f"counter_{m}MiB_{kind}_{what}_ms" for m in sizes]
        if all(k in f for k in keys):
            ax.errorbar(sizes, [_med(f[k]) for k in keys], yerr=_err(*(f[k] for k in keys)),
                        marker="o", capsize=3, label=kind)
    _downtime_and_total(out, made, "by_ram_size.png", "downtime and total time against RAM size",
                        "guest RAM (MiB), counter", by_size)
    # Against the dirty rate (64 MiB).
    cases = mig["series"]["by_dirty"]["cases"]

    def by_dirty(ax, what, kind):
        xs, ys = [], []
        for c in cases:
            key = f"{c}_64MiB_{kind}_{what}_ms"
            rate = (0.0 if c == "counter" else _med(f.get(f"{c}_64MiB_{kind}_dirty_rate_pages_per_s", [0.0])))
            if key in f:
                xs.append(rate)
                ys.append(_med(f[key]))
        ax.plot(xs, ys, marker="o", label=kind)
    _downtime_and_total(out, made, "by_dirty_rate.png",
                        "downtime and total time against the dirty rate (counter, " + ", ".join(cases[1:]) + ")",
                        "round 0 dirty rate (pages/s), 64 MiB", by_dirty)
    return made
