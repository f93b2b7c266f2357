"""Tables and the figure of ``strata bench gpu`` (one JSON, four sections)."""

from __future__ import annotations

from typing import Any

from bench.common import format_table, pyplot


def render_table(result: dict[str, Any]) -> str:
    cfg = result["config"]
    secs = result["sections"]
    parts = [f"strata bench gpu: {cfg['model']} {cfg['dtype']} on {cfg['device']}"
             + (f" ({result['machine'].get('gpu')})" if result["machine"].get("gpu") else "")]
    if "ttft" in secs:
        parts.append(_ttft(secs["ttft"]))
    if "decode" in secs:
        parts.append(_decode(secs["decode"]))
    if "offload" in secs:
        rows = [[r["length"], r["no_store_s"] * 1e3, r["offload_s"] * 1e3,
                 f"{r['overhead']:+.1%}"] for r in secs["offload"]["rows"]]
        parts.append("prefill with the offload running vs no store (medians)\n"
                     + format_table(["tokens", "no store ms", "offload ms", "overhead"], rows))
    if "disagg" in secs:
        parts.append(_disagg(secs["disagg"]))
    for name, err in result["errors"].items():
        parts.append(f"section {name} FAILED: {err}")
    took = ", ".join(f"{k} {v:.0f} s" for k, v in result["section_seconds"].items())
    return "\n\n".join(parts + [f"time: {took}"])


def _ms(x: float | None) -> float | None:
    return None if x is None else x * 1e3


def _ttft(sec: dict[str, Any]) -> str:
    bw = sec["bandwidth_gbps"]
    rows = []
    for r in sec["summary"]:
        rows.append([r["length"], _ms(r.get("peer_s")), _ms(r["cold_s"]),
                     _ms(r["device_s"]), _ms(r["device_floor_s"]),
                     _ms(r["host_s"]), _ms(r["host_floor_s"]), r["host_over_floor"],
                     _ms(r["disk_s"]), _ms(r["disk_floor_s"]),
                     r.get("peer_over_host"), "yes" if r.get("peer_same_token") else "no"])
    head = ("TTFT ms (medians): transformers, Strata cold, warm from HBM / host / disk beside "
            f"floors (HBM {bw['device']:.0f}, host {bw['host']:.1f}, disk {bw['disk']:.2f} GB/s)")
    return head + "\n" + format_table(
        ["tokens", "HF", "cold", "HBM", "floor", "host", "floor", "x floor", "disk", "floor",
         "HF/host", "same token"], rows)


def _decode(sec: dict[str, Any]) -> str:
    eager = {r["batch"]: r for r in sec["eager"]["rows"]}
    graphs = {r["batch"]: r for r in sec["graphs"]["rows"]} if "graphs" in sec else {}
    rows = []
    for b, e in eager.items():
        g = graphs.get(b)
        rows.append([b, e["ms_per_step"], e["tokens_per_s"], g and g["ms_per_step"],
                     g and g["tokens_per_s"], e["roofline_tokens_per_s"],
                     (g or e)["fraction_of_roofline"]])
    roof = sec["eager"]["roofline"]
    return (f"decode (prompt {sec['eager']['config']['prompt_tokens']} tokens); roofline = "
            f"{roof['name']} ({roof['copy_bandwidth_gbps']:.0f} GB/s copy)\n" + format_table(
                ["batch", "eager ms/step", "eager tok/s", "graph ms/step", "graph tok/s",
                 "roofline tok/s", "of roofline"], rows))


def _disagg(sec: dict[str, Any]) -> str:
    loc, srv = sec["colocated"], sec["disaggregated"]
    rows = [[m, _ms(loc[f"{m}_s"]), _ms(srv[f"{m}_s"]), sec[f"{m}_ratio"]]
            for m in ("cold", "device", "host", "disk")]
    out = (f"disaggregated (service: prefill + decode worker) vs colocated (one engine) TTFT at "
           f"{sec['length']} tokens\n"
           + format_table(["run", "colocated ms", "disaggregated ms", "ratio"], rows))
    t = sec.get("kv_transfer")
    if t:
        out += (f"\nhandoff prefill -> decode: {t['blocks']:.0f} blocks, {t['bytes'] / 2**20:.0f} "
                f"MiB in {t['seconds']:.2f} s of sending = {t['gbps']:.2f} GB/s")
    h, c = sec.get("handoff"), sec.get("colocated_handoff")
    if h and c:
        rows = [[name, _ms(x["ttft_s"]), _ms(x["gap12_s"]), _ms(x["per_token_s"]),
                 _ms(x["exposed_s"]), x["exposed_steps"]]
                for name, x in (("disaggregated", h), ("colocated service", c))]
        out += ("\n" + format_table(["service", "TTFT ms", "gap 1->2 ms", "per-token ms",
                                      "exposed ms", "in steps"], rows)
                + f"\nexposed handoff / prefill (cold TTFT): {sec['exposed_over_prefill']:.3f}")
    return out


def plot(result: dict[str, Any], path: str) -> None:
    plt = pyplot()
    secs = result["sections"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    ax = axes[0][0]
    if "ttft" in secs:
        rows = secs["ttft"]["summary"]
        xs = [r["length"] for r in rows]
        if any(r.get("peer_s") for r in rows):
            ax.plot(xs, [r.get("peer_s") or float("nan") for r in rows], "k^-",
                    label="transformers")
        for i, mode in enumerate(("cold", "device", "host", "disk")):
            ax.plot(xs, [r[f"{mode}_s"] for r in rows], "o-", color=f"C{i}", label=mode)
            if mode != "cold":
                ax.plot(xs, [r[f"{mode}_floor_s"] for r in rows], "--", color=f"C{i}", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("TTFT (s)  [dashed: floors]")
        ax.legend(fontsize=7)
    ax.set_title("TTFT")
    ax = axes[0][1]
    if "decode" in secs:
        for name, style in (("eager", "o-"), ("graphs", "s-")):
            if name in secs["decode"]:
                rows = secs["decode"][name]["rows"]
                ax.plot([r["batch"] for r in rows], [r["tokens_per_s"] for r in rows], style,
                        label=name)
        rows = secs["decode"]["eager"]["rows"]
        ax.plot([r["batch"] for r in rows], [r["roofline_tokens_per_s"] for r in rows], "k--",
                label="roofline")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch")
        ax.set_ylabel("decode tokens/s")
        ax.legend(fontsize=7)
    ax.set_title("decode")
    ax = axes[1][0]
    if "offload" in secs:
        rows = secs["offload"]["rows"]
        names = [str(r["length"]) for r in rows]
        ax.bar([i - 0.2 for i in range(len(rows))], [r["no_store_s"] for r in rows], 0.4,
               label="no store")
        ax.bar([i + 0.2 for i in range(len(rows))], [r["offload_s"] for r in rows], 0.4,
               label="offload running")
        ax.set_xticks(range(len(rows)), names)
        ax.set_ylabel("prefill TTFT (s)")
        ax.legend(fontsize=7)
    ax.set_title("prefill with offload")
    ax = axes[1][1]
    if "disagg" in secs:
        sec = secs["disagg"]
        modes = ("cold", "device", "host", "disk")
        ax.bar([i - 0.2 for i in range(4)], [sec["colocated"][f"{m}_s"] for m in modes], 0.4,
               label="colocated")
        ax.bar([i + 0.2 for i in range(4)], [sec["disaggregated"][f"{m}_s"] for m in modes], 0.4,
               label="disaggregated")
        ax.set_xticks(range(4), modes)
        ax.set_yscale("log")
        ax.set_ylabel(f"TTFT (s) at {sec['length']} tokens")
        ax.legend(fontsize=7)
    ax.set_title("disaggregated vs colocated")
    cfg = result["config"]
    fig.suptitle(f"strata bench gpu: {cfg['model']} {cfg['dtype']} on {cfg['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
