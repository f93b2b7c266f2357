"""The PNG of ``strata bench router``: scaling before / after, TTFT and hit rate per policy."""

from __future__ import annotations

from typing import Any

from bench.common import pyplot

POLICY_COLORS = {"prefix-aware": "C0", "load-only": "C1", "random": "C2"}


def plot(result: dict[str, Any], path: str) -> None:
    plt = pyplot()
    rows = result["rows"]
    workers = [r["workers"] for r in rows]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    ax = axes[0][0]
    for key, style in (("placement_p50_ms", "o-"), ("placement_p99_ms", "s--")):
        ax.plot(workers, [r[key] for r in rows], style, color="C0", label=f"after {key[10:13]}")
        if all("before" in r for r in rows):
            ax.plot(workers, [r["before"][key] for r in rows], style, color="C3",
                    label=f"before {key[10:13]}")
    ax.plot(workers, [r["placement_ms"]["mixed"]["p50"] for r in rows], "^:", color="C4",
            label="after p50, mixed residencies")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("workers")
    ax.set_ylabel("choose_prefill, 32K-token prompt (ms)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    ax = axes[0][1]
    width = 0.35
    xs = list(range(len(rows)))
    ax.bar([x - width / 2 for x in xs], [r["events_per_s"] / 1e6 for r in rows], width,
           label="after", color="C0")
    if all("before" in r for r in rows):
        ax.bar([x + width / 2 for x in xs], [r["before"]["events_per_s"] / 1e6 for r in rows],
               width, label="before", color="C3")
    ax.set_xticks(xs, [str(w) for w in workers])
    ax.set_xlabel("workers")
    ax.set_ylabel("block events / s (millions)")
    ax.legend(fontsize=7)
    ax.grid(True, axis="y", alpha=0.3)
    ax = axes[1][0]
    for pol, color in POLICY_COLORS.items():
        for q, style in (("p50", "o-"), ("p90", "s--"), ("p99", "^:")):
            ax.plot(workers, [r["policies"][pol]["ttft_s"][q] for r in rows], style, color=color,
                    label=f"{pol} {q}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("workers")
    ax.set_ylabel("predicted TTFT (s)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=6, ncol=3)
    ax = axes[1][1]
    tiers = ("device", "host", "disk", "remote")
    tier_colors = ("C0", "C1", "C2", "C5")
    n_pol = len(POLICY_COLORS)
    bar_w = 0.8 / n_pol
    for j, pol in enumerate(POLICY_COLORS):
        bottom = [0.0] * len(rows)
        for tier, color in zip(tiers, tier_colors):
            vals = [r["policies"][pol]["hit_rate"][tier] for r in rows]
            ax.bar([x - 0.4 + (j + 0.5) * bar_w for x in xs], vals, bar_w, bottom=bottom,
                   color=color, edgecolor="white", label=tier if j == 0 else None)
            bottom = [b + v for b, v in zip(bottom, vals)]
    ax.axhline(result["trace"]["unbounded_hit_rate"], color="0.3", ls="--",
               label="unbounded cache")
    ax.set_xticks(xs, [str(w) for w in workers])
    ax.set_xlabel("workers (bars: " + " / ".join(POLICY_COLORS) + ")")
    ax.set_ylabel("prompt-token hit rate")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    fig.suptitle("strata bench router: index and placement at scale, simulated workers")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
