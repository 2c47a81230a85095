"""The PNG plots of `hpcmoe report`: the timeline of a prefill and a decode step, expert load,
traffic, rank load per step, failures, and runs compared. Every figure stays under 4000 px a side:
past MAX_ROWS ranks a row is a node (and role), past MAX_COLUMNS experts a column is a block.
"""

from __future__ import annotations

import numpy as np

from hpcmoe.analysis.summary import rank_load_over_steps, roles
from hpcmoe.runfile.metrics import is_comm, is_compute, is_wait


def pyplot():
    """matplotlib.pyplot on the Agg backend, imported only when plotting."""
    try:
        import matplotlib
    except ImportError:
        raise ValueError("hpcmoe report needs matplotlib: pip install 'hpcmoe[plots]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


DPI = 110
MAX_INCHES = 34  # 34 in x 110 dpi = 3740 px: every figure stays under 4000 px a side
MAX_ROWS = 64  # rows a figure draws one per rank; past it, one per node (and role in ma)
MAX_COLUMNS = 64  # experts drawn one per column; past it, blocks of consecutive experts
ROLE_COLOURS = {"attention": "tab:blue", "moe": "tab:orange"}


def inches(size: float) -> float:
    return min(size, MAX_INCHES)


def title(run: dict, what: str) -> str:
    """`stem: what`, saying when the file holds only the steps before a stop."""
    done = run.get("partial")
    return f"{run['stem']}{'' if done is None else f' (PARTIAL: steps 0-{done - 1} only)'}: {what}"


def groups(run: dict) -> list[tuple[str, str, list[int]]]:
    """(label, role, ranks) per figure row over the ranks shown: one per rank up to MAX_ROWS, else one
    per node and role, consecutive nodes merged so that there are at most MAX_ROWS rows."""
    shown = run.get("shown", list(range(run["world_size"])))
    role_of = {r: name for name, ranks in roles(run) for r in ranks}
    tag = (
        (lambda role: f"{'attn' if role == 'attention' else role} ")
        if run["parallel"]["layout"] == "ma"
        else (lambda role: "")
    )
    if len(shown) <= MAX_ROWS:
        return [(f"{tag(role_of[r])}rank {r}", role_of[r], [r]) for r in shown]
    by_node = {}  # (role, node) -> ranks, in rank order
    for r in shown:
        by_node.setdefault((role_of[r], int(run["node_of_rank"][r])), []).append(r)
    per_row = -(-len(by_node) // MAX_ROWS)
    rows = []
    for role in dict.fromkeys(role for role, _ in by_node):
        keys = [key for key in by_node if key[0] == role]
        for i in range(0, len(keys), per_row):
            nodes = [node for _, node in keys[i : i + per_row]]
            ranks = [r for key in keys[i : i + per_row] for r in by_node[key]]
            where = f"node {nodes[0]}" if len(nodes) == 1 else f"nodes {nodes[0]}-{nodes[-1]}"
            rows.append((f"{tag(role)}{where} (ranks {ranks[0]}-{ranks[-1]})", role, ranks))
    return rows


def mark_roles(ax, rows, axis: str = "y") -> None:
    """In ma, tick labels coloured by role and a line where the MoE ranks begin."""
    if not any(role == "moe" for _, role, _ in rows):
        return
    labels = ax.get_yticklabels() if axis == "y" else ax.get_xticklabels()
    for label, (_, role, _) in zip(labels, rows):
        label.set_color(ROLE_COLOURS[role])
    first = next(i for i, (_, role, _) in enumerate(rows) if role == "moe")
    (ax.axhline if axis == "y" else ax.axvline)(first - 0.5, color=ROLE_COLOURS["moe"], linewidth=1.5)


def shown_steps(run: dict) -> list[tuple[str, int]]:
    """(label, step) of the timeline's panels: --step's, else the first step (the prefill) and the
    middle decode step."""
    steps = np.unique(run["timings"]["step"][run["timings"]["step"] >= 0])
    if run.get("step") is not None:
        return [("chosen", run["step"])]
    decode = steps[1:] if len(steps) > 1 and not run.get("steady") else steps
    first = "prefill" if steps[0] == 0 and not run.get("steady") else "first step in the file"
    middle = int(decode[len(decode) // 2])
    return ([(first, int(steps[0]))] if middle != steps[0] else []) + [("representative decode", middle)]


PHASE_KINDS = (
    ("compute", lambda p: is_compute(p)),
    ("communication in flight (thin lanes)", is_comm),
    ("waiting (hatched)", is_wait),
    ("other", lambda p: True),
)


def phase_styles(phases: list[bytes], plt) -> dict[bytes, tuple[dict, int]]:
    """(bar style, lane) per phase: compute solid and waits hatched grey in lane 0, comm phases in thin
    lanes 1..."""
    colours = [plt.get_cmap("tab10")(i) for i in range(10)] + [
        plt.get_cmap("tab20")(2 * i + 1) for i in range(10)
    ]
    hatches = ["//", "\\\\", "xx", "..", "++", "oo"]
    compute = [p for p in phases if is_compute(p) or p == b"output"]
    waits = [p for p in phases if is_wait(p) and p not in compute]
    comms = [p for p in phases if is_comm(p)]
    styles = {p: ({"facecolors": colours[i % 20]}, 0) for i, p in enumerate(compute)}
    styles.update(
        {
            p: ({"facecolors": "0.85", "edgecolor": "0.4", "hatch": hatches[i % 6], "linewidth": 0}, 0)
            for i, p in enumerate(waits)
        }
    )
    styles.update({p: ({"facecolors": plt.get_cmap("Dark2")(i % 8)}, 1 + i) for i, p in enumerate(comms)})
    return styles


def phase_legend(ax, styles: dict) -> None:
    """One legend, its phases under the headings compute / communication / waiting."""
    from matplotlib.patches import Patch

    handles, taken = [], set()
    for heading, test in PHASE_KINDS:
        mine = [p for p in styles if test(p) and p not in taken]
        if mine:
            handles.append(Patch(color="none", label=heading.upper()))
            handles += [
                Patch(label=p.decode(), **{k.removesuffix("s"): v for k, v in styles[p][0].items()})
                for p in mine
            ]
            taken.update(mine)
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)


def plot_timeline(run: dict, path: str) -> None:
    """Bars of the phases of a prefill and a decode step (or --step's) per rank; past MAX_ROWS ranks,
    per node: the rank of the node that ends the step last, the one the others wait for."""
    plt, timings, rows = pyplot(), run["timings"], groups(run)
    panels = shown_steps(run)
    styles = phase_styles(sorted(np.unique(timings["phase"][timings["phase"] != b"step"])), plt)
    lanes = max([lane for _, lane in styles.values()] + [1])
    height = inches(len(panels) * (1.2 + 0.2 * len(rows)))
    fig, axes = plt.subplots(len(panels), 1, figsize=(15, height), squeeze=False)
    for ax, (label, step) in zip(axes[:, 0], panels):
        mine = timings[timings["step"] == step]
        t0 = mine["start"].min()
        ends = {r: mine["end"][mine["rank"] == r].max(initial=t0) for row in rows for r in row[2]}
        drawn = [max(ranks, key=ends.get) for _, _, ranks in rows]  # the slowest of each row's ranks
        for y, rank in enumerate(drawn):
            bars = mine[(mine["rank"] == rank) & (mine["phase"] != b"step")]
            for phase, (style, lane) in styles.items():
                these = bars[bars["phase"] == phase]
                if len(these):
                    spans = [(1e3 * (s - t0), 1e3 * (e - s)) for s, e in zip(these["start"], these["end"])]
                    low, tall = (
                        (y - 0.45, 0.55) if lane == 0 else (y + 0.12 + 0.3 * (lane - 1) / lanes, 0.3 / lanes)
                    )
                    ax.broken_barh(spans, (low, tall), **style)
        grouped = any(len(ranks) > 1 for _, _, ranks in rows)
        ax.set_yticks(
            range(len(rows)),
            [name + (f" r{rank}" if grouped else "") for (name, _, _), rank in zip(rows, drawn)],
            fontsize=8,
        )
        mark_roles(ax, rows)
        ax.set_ylim(len(rows) - 0.5, -0.5)  # rank 0 at the top, no blank band above it
        ax.set_xlabel(f"ms since the start of step {step}")
        ax.set_title(
            title(run, f"{label} step {step}" + (": per row of ranks, its slowest (rN)" if grouped else "")),
            fontsize=10,
        )
    phase_legend(axes[0, 0], styles)
    if any(role == "moe" for _, role, _ in rows):
        axes[-1, 0].text(
            0,
            -0.08 - 0.3 / height,
            "blue labels: attention ranks; orange: MoE ranks",
            transform=axes[-1, 0].transAxes,
            fontsize=8,
            va="top",
        )
    save(fig, path)


def plot_failures(run: dict, path: str) -> None:
    """The whole run's steps per rank (per node past MAX_ROWS ranks) on the run's clock, each failure's
    detection (black) and the end of the step done again after it (green): the recovery is the gap
    between them."""
    plt, timings, rows = pyplot(), run["timings"], groups(run)
    steps = timings[timings["phase"] == b"step"]
    fig, ax = plt.subplots(figsize=(12, inches(1.2 + 0.25 * len(rows))))
    for y, (_, _, ranks) in enumerate(rows):
        mine = steps[np.isin(steps["rank"], ranks)]
        ax.broken_barh(list(zip(mine["start"], mine["end"] - mine["start"])), (y - 0.4, 0.8), color="0.6")
    for row in run["failures"]:
        ax.axvline(row["detected_at"], color="black", lw=1)
        ax.axvline(row["recovered_at"], color="green", lw=1)
        ax.text(
            row["detected_at"],
            -0.6,
            f" rank {row['rank']} dead: {1e3 * (row['recovered_at'] - row['detected_at']):.0f} ms",
            fontsize=8,
            va="bottom",
        )
    ax.set_yticks(range(len(rows)), [name for name, _, _ in rows], fontsize=8)
    mark_roles(ax, rows)
    ax.set_ylim(len(rows) - 0.5, -1)
    ax.set_xlabel(
        "seconds since the common start (gray: steps; black: failure detected; green: its step done again)"
    )
    ax.set_title(title(run, "steps and failures"))
    save(fig, path)


def heatmap(ax, values: np.ndarray, fig, label: str) -> None:
    """imshow with a colour bar from zero, integer ticks, and the numbers in the cells when there are few."""
    from matplotlib.ticker import MaxNLocator

    image = ax.imshow(values, aspect="auto", cmap="viridis", vmin=0, interpolation="nearest")
    fig.colorbar(image, ax=ax, label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    if values.size <= 256:
        middle = values.max() / 2
        for (i, j), v in np.ndenumerate(values):
            text = f"{v:.0f}" if v < 1e4 else f"{v / 1e3:.0f}k" if v < 1e7 else f"{v / 1e6:.0f}M"
            ax.text(
                j, i, text, ha="center", va="center", fontsize=8, color="black" if v > middle else "white"
            )


def plot_expert_load(run: dict, path: str) -> None:
    """Heatmap of token slots [moe_layer, expert], summed over steps and source ranks; past MAX_COLUMNS
    experts, the mean per expert of blocks of consecutive experts."""
    plt = pyplot()
    load = run["routing"].sum(axis=(0, 2))
    imbalance = load.max(axis=1) / np.maximum(load.mean(axis=1), 1e-12)
    layers, experts = load.shape
    block = -(-experts // MAX_COLUMNS)
    if block > 1:
        padded = np.full((layers, -(-experts // block) * block), np.nan)
        padded[:, :experts] = load
        load = np.nanmean(padded.reshape(layers, -1, block), axis=2)
    fig, ax = plt.subplots(
        figsize=(inches(max(6, 0.25 * load.shape[1] + 4)), inches(max(4, 0.4 * layers + 2)))
    )
    heatmap(ax, load, fig, "token slots" + (" (block mean)" if block > 1 else ""))
    ax.set_xlabel(
        "expert"
        if block == 1
        else f"experts, in blocks of {block} (block b: experts {block}b-{block}b+{block - 1})"
    )
    ax.set_ylabel("MoE layer")
    ax.set_title(
        title(
            run,
            f"token slots per expert, all steps (colours from 0; max/mean per layer "
            f"{imbalance.min():.3f}-{imbalance.max():.3f})",
        ),
        fontsize=10,
    )
    save(fig, path)


def plot_traffic(run: dict, path: str) -> None:
    """Heatmap of dispatch bytes [src, dst] between the ranks shown (between nodes past MAX_ROWS ranks),
    with each node's block outlined."""
    plt = pyplot()
    from matplotlib.patches import Rectangle

    rows = groups(run)
    row_of = np.full(run["world_size"], -1)
    for i, (_, _, ranks) in enumerate(rows):
        row_of[ranks] = i
    shown = np.flatnonzero(row_of >= 0)
    traffic = np.zeros((len(rows), len(rows)))
    np.add.at(traffic, (row_of[shown][:, None], row_of[shown][None, :]), run["traffic"][np.ix_(shown, shown)])
    grouped = any(len(ranks) > 1 for _, _, ranks in rows)
    side = inches(max(6, 0.22 * len(rows) + 4))
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    heatmap(ax, traffic, fig, "bytes" + (" (summed over each row's ranks)" if grouped else ""))
    names = [name for name, _, _ in rows]
    ax.set_xticks(range(len(rows)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(rows)), names, fontsize=7)
    mark_roles(ax, rows, "y")
    if not grouped:
        nodes = run["node_of_rank"][shown]
        start = 0
        for i in range(1, len(shown) + 1):  # one square per run of consecutive rows on one node
            if i == len(shown) or nodes[i] != nodes[start]:
                ax.add_patch(
                    Rectangle(
                        (start - 0.5, start - 0.5),
                        i - start,
                        i - start,
                        fill=False,
                        edgecolor="red",
                        linewidth=2,
                    )
                )
                start = i
    ax.set_xlabel("destination")
    ax.set_ylabel("source")
    what = "dispatch bytes, all steps" + ("" if grouped else " (red: ranks of one node)")
    ax.set_title(title(run, what), fontsize=10)
    save(fig, path)


def plot_rank_load(run: dict, path: str) -> None:
    """Each rank's (expert group's) share of the token slots per step, and max/mean per step, with
    the switches of online rebalancing marked."""
    plt = pyplot()
    load = rank_load_over_steps(run)
    if len(run["failures"]):  # the survivors' placements are not in the file: show the steps before
        load = load[: max(1, int(min(run["failures"]["step"])))]
    share = load / np.maximum(load.sum(1, keepdims=True), 1e-12)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(inches(max(7, 0.3 * len(load) + 4)), 7), sharex=True)
    from matplotlib.ticker import MaxNLocator

    image = top.imshow(share.T, aspect="auto", cmap="viridis", interpolation="nearest", vmin=0)
    # both panels keep one width
    fig.colorbar(image, ax=[top, bottom], label="share of the step's token slots")
    top.yaxis.set_major_locator(MaxNLocator(integer=True))
    top.set_ylabel("rank" if int(run["placement_attrs"].get("expert_tp", 1)) == 1 else "expert group")
    bottom.plot(range(len(load)), load.max(1) / np.maximum(load.mean(1), 1e-12), marker="o")
    bottom.axhline(1.0, color="0.6", linewidth=0.8)
    for i, (step, _) in enumerate(run["switches"]):
        for ax in (top, bottom):
            ax.axvline(
                step - 0.5, color="red", linestyle="--", label="switch" if i == 0 and ax is bottom else None
            )
    for row in run["failures"]:
        for ax in (top, bottom):
            ax.axvline(
                row["step"] - 0.5,
                color="black",
                linestyle=":",
                label=f"rank {row['rank']} failed" if ax is bottom else None,
            )
    if len(run["switches"]) or len(run["failures"]):
        bottom.legend()
    bottom.set_xlabel("step")
    bottom.set_ylabel("rank load max / mean")
    top.set_title(title(run, "rank load per step (red: placement switches; black: failures)"))
    fig.savefig(path, dpi=DPI)  # not save(): tight_layout cannot place a colour bar shared by two panels
    plt.close(fig)


def plot_compare(runs: list[dict], path: str) -> None:
    """Bars of tps, ttft_ms and tpot_ms, one bar per run."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(4 + 1.5 * len(runs), 4))
    names = [run["stem"] for run in runs]
    for ax, key, unit in zip(axes, ("tps", "ttft_ms", "tpot_ms"), ("tokens/s", "ms", "ms")):
        values = [run["metrics"].get(key, np.nan) for run in runs]
        bars = ax.bar(names, values, color=plt.get_cmap("tab10")(range(len(runs))))
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
        ax.set_title(key)
        ax.set_ylabel(unit)
        ax.tick_params(axis="x", labelrotation=30)
    fig.suptitle("hpcmoe runs compared")
    save(fig, path)


def save(fig, path: str) -> None:
    """Write the figure as PNG and close it."""
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    pyplot().close(fig)
