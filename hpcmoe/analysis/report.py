"""Offline analysis of run files: `hpcmoe report RUN.h5 [MORE.h5 ...] [--out DIR]`: a text summary
per run, and PNG plots `<stem>.timeline.png`, `.expert_load.png`, `.traffic.png`, `.rank_load.png`,
`.failures.png` after a dead rank (+ `compare.png`)."""

from __future__ import annotations

import os

import numpy as np
import yaml

from hpcmoe.runfile.output import is_comm, is_compute, is_wait, length, union

DATASETS = ("generated", "prompt_lengths", "routing", "traffic", "placement", "timings", "metrics")
METRICS = (
    "ttft_ms",
    "tpot_ms",
    "tps",
    "prefill_tokens_per_s",
    "decode_tokens_per_s",
    "output_tokens_per_s",
    "prompt_tokens_per_s",
    "requests_per_s",
    *(f"request_{name}_p{q}" for name in ("ttft_ms", "itl_ms", "latency_s") for q in (50, 90, 99)),
    "wall_s",
    "load_s",
    "wall_with_load_s",
    "idle_fraction",
    "busy_fraction",
    "busy_fraction_attention",
    "busy_fraction_moe",
    "idle_fraction_attention",
    "idle_fraction_moe",
)


def load(path: str) -> dict:
    """Everything the report needs from one run file; ValueError if it is not a complete run."""
    import h5py

    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    try:
        f = h5py.File(path, "r")
    except OSError:
        raise ValueError(f"{path}: not an HDF5 file") from None
    with f:
        missing = [name for name in DATASETS if name not in f] + [
            name for name in ("config", "world_size", "node_of_rank") if name not in f.attrs
        ]
        # a run stopped by a signal (NAME.partial.h5) holds its steps so far; a killed one nothing usable
        partial = None if f.attrs.get("complete", False) else f.attrs.get("stopped_at_step")
        if missing or (partial is None and not f.attrs.get("complete", False)):
            why = f"missing {', '.join(missing)}" if missing else "complete is not set"
            raise ValueError(f"{path}: not a complete hpcmoe run file ({why})")
        try:
            parallel = yaml.safe_load(f.attrs["config"])["parallel"]
        except (yaml.YAMLError, KeyError, TypeError):
            raise ValueError(f"{path}: not a complete hpcmoe run file (unreadable config)") from None
        return {
            "path": path,
            "stem": os.path.splitext(os.path.basename(path))[0],
            "parallel": parallel,
            "world_size": int(f.attrs["world_size"]),
            "node_of_rank": np.asarray(f.attrs["node_of_rank"]),
            "partial": None if partial is None else int(partial),
            "steady": "steady_decode_context" in f.attrs,
            "routing": f["routing"][:],
            "traffic": summed_traffic(f["traffic"]),
            "timings": f["timings"][:],
            "placement": f["placement"][:],
            "placement_attrs": dict(f["placement"].attrs),
            "switches": [(int(row["step"]), row["placement"]) for row in f["placement_history"][:]]
            if "placement_history" in f
            else [],
            "failures": f["metrics/failures"][:] if "metrics/failures" in f else [],
            "metrics": {
                k: float(v) for k, v in f["metrics"].attrs.items() if isinstance(v, (int, float, np.number))
            },
            "samples": samples(f, yaml.safe_load(f.attrs["config"])["model"].get("checkpoint")),
        }


def summed_traffic(dataset) -> np.ndarray:
    """[src_rank, dst_rank] bytes over all steps and layers, one step at a time (the whole dataset
    is 1 GB at 1024 ranks)."""
    total = np.zeros(dataset.shape[2:], dtype=np.int64)
    for step in range(dataset.shape[0]):
        total += dataset[step].sum(axis=0)
    return total


SHOWN_REQUESTS, SHOWN_CHARACTERS = 3, 120


def samples(f, checkpoint) -> list[tuple[str, str, str]]:
    """(request id, prompt, completion) of the first requests: text through the checkpoint's
    tokenizer when it has one, else token ids."""
    from hpcmoe.workload import decode

    ids = (
        [x.decode() for x in f["request_ids"][:SHOWN_REQUESTS]]
        if "request_ids" in f
        else [str(i) for i in range(min(SHOWN_REQUESTS, len(f["generated"])))]
    )
    shown = []
    for i, request in enumerate(ids):
        prompt, made = f["prompt_ids"][i], f["generated"][i]
        as_text = lambda tokens: decode(checkpoint, tokens)
        text = (as_text(prompt), as_text(made)) if "generated_text" in f else (None, None)
        prompt_shown = text[0] if text[0] is not None else " ".join(map(str, prompt[prompt >= 0]))
        made_shown = text[1] if text[1] is not None else " ".join(map(str, made[made >= 0]))
        shown.append((request, prompt_shown[:SHOWN_CHARACTERS], made_shown[:SHOWN_CHARACTERS]))
    return shown


def roles(run: dict) -> list[tuple[str, list[int]]]:
    """(name, ranks) of each role: all ranks for ep; attention and moe ranks for ma."""
    ranks = list(range(run["world_size"]))
    if run["parallel"]["layout"] != "ma":
        return [("all ranks", ranks)]
    attention = run["parallel"]["attention_ranks"]
    return [("attention", ranks[:attention]), ("moe", ranks[attention:])]


def phase_seconds(timings: np.ndarray, ranks: list[int]) -> dict[str, float]:
    """Total seconds of each phase summed over `ranks`, divided by their number, longest first."""
    rows = timings[np.isin(timings["rank"], ranks)]
    totals = {}
    for phase in np.unique(rows["phase"]):
        mine = rows[rows["phase"] == phase]
        totals[phase.decode()] = float((mine["end"] - mine["start"]).sum()) / len(ranks)
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


def kind_seconds(timings: np.ndarray, ranks: list[int]) -> dict[str, float]:
    """Mean per rank of the merged compute, communication-in-flight and wait time."""
    kinds = {"compute": is_compute, "comm": is_comm, "wait": is_wait}
    totals = dict.fromkeys(kinds, 0.0)
    for rank in ranks:
        rows = timings[timings["rank"] == rank]
        for kind, test in kinds.items():
            totals[kind] += length(union([(r["start"], r["end"]) for r in rows if test(r["phase"])]))
    return {kind: total / len(ranks) for kind, total in totals.items()}


def summary(run: dict) -> str:
    """The text summary of one run, one `key: value` per line."""
    p, m = run["parallel"], run["metrics"]
    lines = (
        [f"run: {run['path']}"]
        + (partial_lines(run) if run.get("partial") is not None else [])
        + [
            f"layout: {p['layout']}",
            f"world_size: {run['world_size']}",
            f"num_nodes: {len(np.unique(run['node_of_rank']))}",
            "metrics:",
        ]
    )
    for key in METRICS:
        if key in m:
            lines.append(f"  {key}: {m[key]:.4f}" if "fraction" in key else f"  {key}: {m[key]:.3f}")
    for name, ranks in roles(run):
        which = f"ranks {ranks[0]}-{ranks[-1]}" if len(ranks) > 1 else f"rank {ranks[0]}"
        lines.append(f"phase seconds per rank, {name} ({which}):")
        lines += [f"  {phase}: {s:.6f}" for phase, s in phase_seconds(run["timings"], ranks).items()]
        merged = kind_seconds(run["timings"], ranks)
        lines.append("  merged: " + ", ".join(f"{kind} {s:.6f}" for kind, s in merged.items()))
    slots = run["routing"].sum(axis=(0, 1, 2))  # token slots per expert: all steps, layers, sources
    lines += [
        "load imbalance:",
        f"  rank_load_max_over_mean: {m.get('rank_load_max_over_mean', np.nan):.4f}",
        f"  expert_slots_max: {slots.max()}",
        f"  expert_slots_mean: {slots.mean():.3f}",
        f"  expert_slots_max_over_mean: {slots.max() / max(slots.mean(), 1e-12):.4f}",
    ]
    attrs = run["placement_attrs"]
    tp = int(attrs.get("expert_tp", 1))
    lines.append(
        f"placement (moe layer 0): mode {attrs.get('mode', '?')}, source {attrs.get('source', '?')}"
        + (f", expert_tp {tp}: each replica on the {tp} ranks from the one listed" if tp > 1 else "")
    )
    lines += placement_lines(run["placement"][0])
    for row in run["failures"]:
        lines.append(
            f"failure: rank {row['rank']} in step {row['step']} (layer {row['layer']}, {row['phase'].decode() or '-'}):"
            f" detected at {row['detected_at']:.3f} s, recovered (its step done again) at "
            f"{row['recovered_at']:.3f} s: recovery {1e3 * (row['recovered_at'] - row['detected_at']):.0f} ms; "
            f"{row['action'].decode()}"
        )
    if run["switches"]:
        load = rank_load_over_steps(run)
        ratio = load.max(1) / np.maximum(load.mean(1), 1e-12)
        lines.append(
            f"online rebalancing: {len(run['switches'])} switch(es), at steps "
            f"{', '.join(str(step) for step, _ in run['switches'])}; rank load max/mean per step: "
            f"mean {ratio.mean():.3f}"
        )
    lines.append(f"first {len(run['samples'])} requests (prompt -> completion):")
    lines += [f"  {request}: {prompt!r} -> {completion!r}" for request, prompt, completion in run["samples"]]
    return "\n".join(lines)


def partial_lines(run: dict) -> list[str]:
    done = run["partial"]
    return [
        f"partial: yes, stopped at step {done} (steps 0-{done - 1} done so far; a time-limit or signal stop)"
    ]


PLACEMENT_LINES = 16  # experts listed one per line; past it, a summary and the first few


def placement_lines(table: np.ndarray) -> list[str]:
    """`expert E -> ranks ...` lines; for many experts the replica counts, the experts per rank and
    the first PLACEMENT_LINES experts, so that 1024 experts do not print 1024 lines."""
    listed = [[int(r) for r in replicas if r >= 0] for replicas in table]
    lines = [f"  expert {e} -> ranks {' '.join(map(str, ranks))}" for e, ranks in enumerate(listed)]
    if len(listed) <= PLACEMENT_LINES:
        return lines
    replicas = np.bincount([len(ranks) for ranks in listed])
    per_rank = np.bincount([r for ranks in listed for r in ranks])
    hosting = per_rank[per_rank > 0]
    counts = ", ".join(f"{n}: {count} experts" for n, count in enumerate(replicas) if count)
    return (
        [
            f"  replicas per expert: {counts}",
            f"  experts per hosting rank: min {hosting.min()}, max {hosting.max()}, over {len(hosting)} ranks",
        ]
        + lines[:PLACEMENT_LINES]
        + [f"  ... {len(listed) - PLACEMENT_LINES} more experts (all: the file's /placement)"]
    )


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
    """(bar style, lane) per phase: compute solid and waits hatched grey in lane 0, comm phases in thin lanes 1..."""
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
    detection (black) and the end of the step done again after it (green): the recovery is the gap between them."""
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


def rank_load_over_steps(run: dict) -> np.ndarray:
    """[steps, places] token slots each rank (expert group) receives per step: the step's /routing on
    the placement in force (the initial one, then each switch's from its step), split over replicas
    as the dispatcher splits them (output.rank_loads, summed over MoE layers; 0 where no expert)."""
    from hpcmoe.runfile.output import rank_loads

    in_force = [(0, run["placement"][0])] + list(run["switches"])
    loads = rank_loads(
        run["routing"],
        in_force,
        [int(n) for n in run["node_of_rank"]],
        int(run["placement_attrs"].get("expert_tp", 1)),
    )
    return np.nan_to_num(loads).sum(axis=1)


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
    fig.colorbar(
        image, ax=[top, bottom], label="share of the step's token slots"
    )  # both panels keep one width
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


def plot_paths(runs: list[dict], out: str | None) -> list[tuple]:
    """(plot function, argument, path) of every plot; ValueError if two would share a path."""
    plots = []
    for run in runs:
        folder = out or os.path.dirname(os.path.abspath(run["path"]))
        for name, function in (
            ("timeline", plot_timeline),
            ("expert_load", plot_expert_load),
            ("traffic", plot_traffic),
            ("rank_load", plot_rank_load),
        ):
            plots.append((function, run, os.path.join(folder, f"{run['stem']}.{name}.png")))
        if len(run["failures"]):
            plots.append((plot_failures, run, os.path.join(folder, f"{run['stem']}.failures.png")))
    if len(runs) > 1:
        folder = out or os.path.dirname(os.path.abspath(runs[0]["path"]))
        plots.append((plot_compare, runs, os.path.join(folder, "compare.png")))
    paths = [path for _, _, path in plots]
    if len(set(paths)) < len(paths):
        raise ValueError("two runs would write the same plot files: give runs with distinct file names")
    return plots


def parse_range(text: str, flag: str) -> tuple[int, int]:
    """`A-B` or `A` -> (A, B); ValueError naming the flag otherwise."""
    first, _, last = text.partition("-")
    try:
        low, high = int(first), int(last or first)
    except ValueError:
        low, high = 0, -1
    if not 0 <= low <= high:
        raise ValueError(f"{flag} {text}: expected A-B with 0 <= A <= B, e.g. {flag} 0-15")
    return low, high


def choose(run: dict, ranks: str | None, nodes: str | None, step: int | None) -> None:
    """Store the ranks (run["shown"]) and step the figures show; ValueError if the run has no such ones."""
    world, node_of_rank = run["world_size"], run["node_of_rank"]
    shown = set(range(world))
    if ranks is not None:
        low, high = parse_range(ranks, "--ranks")
        if high >= world:
            raise ValueError(f"--ranks {ranks}: {run['path']} has ranks 0-{world - 1}")
        shown &= set(range(low, high + 1))
    if nodes is not None:
        low, high = parse_range(nodes, "--nodes")
        if high > node_of_rank.max():
            raise ValueError(f"--nodes {nodes}: {run['path']} has nodes 0-{node_of_rank.max()}")
        shown &= {r for r in range(world) if low <= node_of_rank[r] <= high}
    if not shown:
        raise ValueError(f"--ranks {ranks} --nodes {nodes}: no rank of {run['path']} is in both")
    run["shown"] = sorted(shown)
    if step is not None:
        steps = np.unique(run["timings"]["step"][run["timings"]["step"] >= 0])
        if step not in steps:
            raise ValueError(
                f"--step {step}: {run['path']} has steps {steps[0]}-{steps[-1]}"
                + (" (a partial file)" if run.get("partial") is not None else "")
            )
    run["step"] = step


def figures(run: dict) -> dict:
    """The figures users compare, of one run (run.metrics attributes, NaN where the run has none)."""
    return {
        "run": run["path"],
        **{key: run["metrics"].get(key, float("nan")) for key in METRICS},
        "rank_load_max_over_mean": run["metrics"].get("rank_load_max_over_mean", float("nan")),
        "rank_load_max_over_mean_per_step": run["metrics"].get(
            "rank_load_max_over_mean_per_step", float("nan")
        ),
    }


def write_figures(loaded: list[dict], json_path: str | None, csv_path: str | None) -> None:
    """--json: a list of objects, one per run; --csv: a header and one row per run; the same keys."""
    import csv
    import json

    rows = [figures(run) for run in loaded]
    if json_path:
        with open(json_path, "w") as f:
            json.dump(rows, f, indent=1)
    if csv_path:
        with open(csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def main(
    runs: list[str],
    out: str | None,
    ranks: str | None = None,
    step: int | None = None,
    nodes: str | None = None,
    json_path: str | None = None,
    csv_path: str | None = None,
    overwrite: bool = False,
) -> int:
    """Print the summary of each run, write the figures (--json, --csv) and the plots, print their
    paths. Existing files are refused before any work unless `overwrite`."""
    from hpcmoe.runfile.output import check_new_output, check_output_path

    for path, flag in ((json_path, "--json"), (csv_path, "--csv")):
        if path:
            check_output_path(path, flag, f"report.{flag[2:]}", create=False)
            check_new_output(path, overwrite, flag)
    loaded = [load(path) for path in runs]
    for run in loaded:
        choose(run, ranks, nodes, step)
    plots = plot_paths(loaded, out)
    for _, _, path in plots:
        check_new_output(path, overwrite, "--output")
    if out and os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out}: not a directory")
    pyplot()  # fail before printing anything when matplotlib is missing
    for run in loaded:
        print(summary(run), end="\n\n")
    write_figures(loaded, json_path, csv_path)
    if out:
        os.makedirs(out, exist_ok=True)
    from hpcmoe.progress import Progress

    progress = Progress("hpcmoe report", len(plots), "figures")  # on stderr: the figures' list stays clean
    for done, (function, argument, path) in enumerate(plots):
        progress.update(done)
        function(argument, path)
        print(f"wrote {path}", flush=True)
    return 0
