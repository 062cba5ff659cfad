"""The docs' plots, drawn from the same result files as the tables (matplotlib, Agg, PNG).

Each plot is a function of the loaded result files that returns a figure; PLOTS maps its file name
in docs/img/ to it. To add one, write the function and add a line to PLOTS.
"""
from __future__ import annotations

import pathlib

import matplotlib

matplotlib.use("Agg")  # no display: the PNGs are files, rendered the same on any machine
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402

from cprec.report.paths import IMG, RESULTS  # noqa: E402
from cprec.report.rivals import BACKBONE_NAMES, METHOD_NAMES  # noqa: E402
from cprec.report.table import load_table  # noqa: E402


def num(value) -> float | None:
    """A cell as a number (cells are numbers, or text such as "1,278" where the source had it)."""
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(str(value).replace(",", "").rstrip("x"))
    except ValueError:
        return None


def frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The Pareto front: the points no other point beats with fewer parameters and higher quality."""
    front, best = [], float("-inf")
    for x, y in sorted(points):
        if y > best:
            front.append((x, y))
            best = y
    return front


def _quality_panel(ax, title: str, groups: list[tuple[str, str, list[dict]]], baseline: dict | None,
                   baseline_label: str = "NextItNet, uncompressed"):
    every = []
    for label, marker, rows in groups:
        pts = [(num(r["params/total"]), num(r["test/mrr@5"])) for r in rows]
        pts = [p for p in pts if p[0] and p[1] is not None]
        every += pts
        if pts:
            ax.scatter(*zip(*pts), marker=marker, s=36, label=label, zorder=3)
    ax.plot(*zip(*frontier(every)), color="0.5", lw=1, drawstyle="steps-post", zorder=2, label="Pareto front (compressed)")
    if baseline:
        params, quality = num(baseline["params/total"]), num(baseline["test/mrr@5"])
        ax.axhline(quality, color="k", ls="--", lw=1, label=f"{baseline_label} ({params:,.0f} params)")
        ax.scatter([params], [quality], marker="*", s=120, color="k", zorder=3)
    ax.set_xscale("log")
    ax.set_xlabel("parameters (count, log scale)")
    ax.set_ylabel("test MRR@5 (full ranking)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")


def pareto(results: pathlib.Path) -> plt.Figure:
    """Quality against parameters for every compression setting measured, one panel per dataset."""
    small = load_table("runs-small", results)["rows"]
    by_cmd = lambda s, *exclude: [r for r in small if s in r["command"] and not any(e in r["run"] for e in exclude)]
    # The budget and tied tables repeat the hand-set preset as a reference row; it is plotted once.
    b30 = [r for r in load_table("synthetic30k-budget", results)["rows"] if r["clusters"] != "hand-set preset"]
    tied30 = [r for r in load_table("synthetic30k-tied", results)["rows"] if not r["run"].startswith("untied")]
    m1 = load_table("synthetic1m", results)["rows"]
    b1m = [r for r in load_table("synthetic1m-budget", results)["rows"] if r["clusters"] != "hand-set preset"]
    untied_b30 = [r for r in b30 if "tied" not in r["clusters"]]
    t1m = load_table("synthetic1m-tied", results)["rows"]
    base = lambda rows: rows[0]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8.5))
    ml = by_cmd("nextitnet.py:ml100k,tuned=false")
    _quality_panel(axes[0, 0], "ml-100k, untied, 40 epochs", [
        ("CpRec, the 5 sharing schemes", "o", by_cmd("cprec.py:ml100k"))], base(ml))
    syn = by_cmd("`experiments/nextitnet.py`")
    _quality_panel(axes[0, 1], "synthetic, 3,000 items (the default experiment)", [
        ("CpRec (cross_block)", "o", by_cmd("`experiments/cprec.py`"))], base(syn))
    s30 = by_cmd("nextitnet.py:synthetic30k", "epochs")
    _quality_panel(axes[1, 0], "synthetic30k, 4 epochs", [
        ("CpRec, hand-set clusters and ablations", "o", by_cmd("cprec.py:synthetic30k", "epochs")),
        ("CpRec, budget solver", "s", untied_b30),
        ("tied CpRec", "^", tied30 + [r for r in b30 if r not in untied_b30])], base(s30))
    # The full softmax at 1M items needs a GPU; the uncompressed model trained here has a sampled softmax.
    sampled = [r for r in m1 if r["run"].startswith("NextItNet, sampled")]
    _quality_panel(axes[1, 1], "synthetic1m, 1 epoch, 10,000 test users", [
        ("CpRec, the 5 sharing schemes", "o", [r for r in m1 if r["run"].startswith("cprec")]),
        ("CpRec, budget solver", "s", b1m),
        ("tied CpRec", "^", [r for r in t1m if r["run"].startswith("tied") and "cosine" not in r["lr"]]),
        ("cosine-decayed lr (untied, tied)", "D", [r for r in t1m if "cosine" in r["lr"]])],
        sampled[0] if sampled else None, "NextItNet, uncompressed, sampled softmax")
    fig.suptitle("Quality against parameters (seed 0; higher and further left is better)")
    fig.tight_layout()
    return fig


def early_stop(results: pathlib.Path) -> plt.Figure:
    """The early-stop top-20's speed-up over the full ranking, against batch size, at 1M items."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    rows = load_table("bench-tree-softmax-topk", results)["rows"]
    for setting in dict.fromkeys(r["parameters"] for r in rows):
        pts = [(r["batch"], num(r["speed_up"])) for r in rows if r["parameters"] == setting]
        ax.plot(*zip(*pts), marker="o", label=f"output layer, {setting}")
    trained = load_table("bench-trained-topk", results)["rows"]
    ax.plot([r["batch"] for r in trained], [num(r["output_speedup"]) for r in trained], marker="s", lw=2,
            color="k", label="output layer, trained CpRec")
    ax.plot([r["batch"] for r in trained], [num(r["model_speedup"]) for r in trained], marker="s", ls="--",
            color="k", label="whole model (encoder included), trained CpRec")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks([1, 256], ["1", "256"])
    ax.set_xlabel("batch size (histories per call)")
    ax.set_ylabel("speed-up over full ranking (x, log scale)")
    ax.set_title("Early-stop top-20 at 1M items against lax.top_k(log_prob) (CPU)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def server(results: pathlib.Path) -> plt.Figure:
    """The HTTP server's throughput and p99 latency against concurrency, batched and unbatched."""
    rows = load_table("server-1m", results)["rows"]
    fig, (tp, p99) = plt.subplots(1, 2, figsize=(11, 4.2))
    for kind, ls in (("recommend", "-"), ("session", "--")):
        mine = [r for r in rows if r["requests"] == kind]
        conc = [r["concurrency"] for r in mine]
        for mode, color in (("batched", "C0"), ("unbatched", "C1")):
            label = f"{kind}, {mode}"
            tp.plot(conc, [num(r[f"{mode}_rps"]) for r in mine], ls=ls, marker="o", color=color, label=label)
            p99.plot(conc, [num(r[f"{mode}_p99_ms"]) for r in mine], ls=ls, marker="o", color=color, label=label)
    for ax in (tp, p99):
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 8, 64, 256], ["1", "8", "64", "256"])
        ax.set_xlabel("concurrent connections (closed loop)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    tp.set_ylabel("throughput (requests/s)")
    p99.set_ylabel("p99 latency (ms, log scale)")
    p99.set_yscale("log")
    fig.suptitle("HTTP server, 1M items, int8 CpRec, 2-core CPU (wrk, closed loop)", fontsize=10)
    fig.tight_layout()
    return fig


def _by_backbone(rows: list[dict]) -> tuple[dict[str, list[dict]], dict[str, dict]]:
    """The rivals table's rows per backbone (NextItNet first), and one style per method, the same in
    every panel: a method's rows on SASRec ("QR / SASRec") look like its rows on NextItNet."""
    panels: dict[str, list[dict]] = {}
    for r in rows:
        panels.setdefault(r.get("backbone", "nextitnet"), []).append(r)
    base = lambda r: r["method"].split(" / ")[0]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    # every method's style from one fixed order, so a method looks the same on every dataset's plot
    names = dict.fromkeys([n for k, n in METHOD_NAMES.items() if k != "full"]
                          + [base(r) for r in rows if r["budget"] != "none"])
    styles = {n: {"marker": "os^Dvp<>*hX"[i % 11], "color": colors[i % len(colors)]} for i, n in enumerate(names)}
    return panels, {r["method"]: styles.get(base(r), {"marker": "*", "color": "k"}) for r in rows}


def _panels(count: int) -> tuple[plt.Figure, list]:
    fig, axes = plt.subplots(count, 1, figsize=(9, 4.4 * count), squeeze=False)
    return fig, list(axes[:, 0])


def _short(value: float, _pos=None) -> str:
    """180k, 4.1M: tick labels that fit beside each other."""
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}"


def _log_x(ax: plt.Axes, label: str) -> None:
    """A log x axis with short labels at 1, 2 and 5 of each decade; over a narrow range (one panel's
    methods at one budget) a few evenly spaced ones, where matplotlib's default labels every minor
    tick in scientific notation, overlapping."""
    ax.set_xscale("log")
    ax.set_xlabel(label)
    lo, hi = ax.get_xlim()
    if hi / lo < 3:
        ax.xaxis.set_major_locator(ticker.MaxNLocator(5))
        ax.xaxis.set_minor_locator(ticker.NullLocator())
    else:
        ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(_short))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())


def rivals(results: pathlib.Path, dataset: str) -> plt.Figure:
    """Test MRR@5 against parameters, one line per compression method (results/rivals-DATASET.json),
    seed spread as error bars, the uncompressed backbone as a horizontal line; a panel per backbone."""
    spec = load_table(f"rivals-{dataset}", results)
    panels, styles = _by_backbone(spec["rows"])
    fig, axes = _panels(len(panels))
    for ax, (backbone, rows) in zip(axes, panels.items()):
        for method in dict.fromkeys(r["method"] for r in rows if r["budget"] != "none"):
            mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["params/total"])
            x = [r["params/total"] for r in mine]
            y = [r["test/mrr@5"] for r in mine]
            err = [r.get("test/mrr@5_std", 0.0) for r in mine]
            ax.errorbar(x, y, yerr=err, ms=6, capsize=3, lw=1.2, label=method, **styles[method])
        for r in rows:
            if r["budget"] == "none":
                ax.axhline(r["test/mrr@5"], color="k", ls="--", lw=1,
                           label=f"{r['method']} ({r['params/total']:,} params)")
        _log_x(ax, "parameters (count, log scale)")
        ax.set_ylabel("test MRR@5 (full ranking)")
        seeds = sorted({int(s) for r in rows for s in str(r.get("seeds", "")).split()})  # this panel's, not the table's
        ax.set_title(f"{dataset}, {BACKBONE_NAMES.get(backbone, backbone)}: compression methods at equal budgets "
                     f"(lr chosen on validation; seeds {', '.join(map(str, seeds))})", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes: no point hidden
    fig.tight_layout()
    return fig


def rivals_bytes(results: pathlib.Path, dataset: str) -> plt.Figure:
    """Test MRR@5 against stored bytes: each method's float32 artifact (filled) and its int8 export
    (hollow, joined to its float32 point), where the table has the int8 export's metrics; a panel per backbone."""
    spec = load_table(f"rivals-{dataset}", results)
    panels, styles = _by_backbone(spec["rows"])
    fig, axes = _panels(len(panels))
    for ax, (backbone, rows) in zip(axes, panels.items()):
        labelled: set[str] = set()  # a method at several budgets gets one legend entry per format

        def label(text: str) -> str | None:
            new = text not in labelled
            labelled.add(text)
            return text if new else None

        for r in rows:
            style = styles[r["method"]]
            ax.scatter([r["bytes_float32"]], [r["test/mrr@5"]], marker=style["marker"], color=style["color"], s=36,
                       label=label(f"{r['method']}, float32"), zorder=3)
            if "int8/test/mrr@5" not in r:
                continue
            ax.scatter([r["bytes_int8"]], [r["int8/test/mrr@5"]], marker=style["marker"], s=36, facecolors="none",
                       edgecolors=[style["color"]], label=label(f"{r['method']}, int8"), zorder=3)
            ax.plot([r["bytes_float32"], r["bytes_int8"]], [r["test/mrr@5"], r["int8/test/mrr@5"]],
                    color=style["color"], lw=0.8, alpha=0.6)
        _log_x(ax, "stored bytes of the parameters (log scale)")
        ax.set_ylabel("test MRR@5 (full ranking)")
        ax.set_title(f"{dataset}, {BACKBONE_NAMES.get(backbone, backbone)}: quality against artifact size, "
                     "float32 and int8 exports", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig


RIVAL_DATASETS = ("synthetic30k", "synthetic1m", "ml100k")  # the rivals tables drawn (results/rivals-DATASET.json)
PLOTS = {"pareto.png": pareto, "early-stop.png": early_stop, "server.png": server,
         **{f"rivals-{d}.png": (lambda results, d=d: rivals(results, d)) for d in RIVAL_DATASETS},
         **{f"rivals-{d}-bytes.png": (lambda results, d=d: rivals_bytes(results, d)) for d in RIVAL_DATASETS}}


def render_plots(results: pathlib.Path = RESULTS, out: pathlib.Path = IMG) -> list[pathlib.Path]:
    """Draws every plot of PLOTS into `out`; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, draw in PLOTS.items():
        fig = draw(results)
        # Fixed metadata: re-rendering unchanged data gives byte-identical PNGs (no spurious diffs).
        fig.savefig(out / name, dpi=100, metadata={"Software": None})
        plt.close(fig)
        written.append(out / name)
    return written
