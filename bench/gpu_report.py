"""Tables and the figure of ``strata bench gpu`` (one summary JSON, one section each)."""

from __future__ import annotations

from typing import Any

from bench.common import format_table, pyplot


def render_table(result: dict[str, Any]) -> str:
    cfg = result["config"]
    secs = result["sections"]
    gpu = result["machine"].get("gpu")
    parts = [f"strata bench gpu: {cfg['model']} {cfg['dtype']} on {cfg['device']}"
             + (f" ({gpu})" if gpu else "")]
    if "correctness" in secs:
        parts.append(_correctness(secs["correctness"]))
    for name in ("ttft", "ttft-long"):
        if name in secs:
            parts.append(_ttft(secs[name]))
    if "decode" in secs:
        parts.append(_decode(secs["decode"]))
    if "determinism" in secs:
        parts.append(_determinism(secs["determinism"]))
    if "disagg" in secs:
        parts.append(_disagg(secs["disagg"]))
    if "kernels" in secs:
        parts.append(_kernels(secs["kernels"]))
    if "offload" in secs:
        rows = [[r["length"], r["no_store_s"] * 1e3, r["offload_s"] * 1e3,
                 f"{r['overhead']:+.1%}"] for r in secs["offload"]["rows"]]
        parts.append("prefill with the offload running vs no store (medians)\n"
                     + format_table(["tokens", "no store ms", "offload ms", "overhead"], rows))
    for name, err in result["errors"].items():
        parts.append(f"section {name} FAILED: {err}")
    for name, why in result.get("skipped", {}).items():
        parts.append(f"section {name} skipped: {why}")
    took = ", ".join(f"{k} {v:.0f} s" for k, v in result["section_seconds"].items())
    return "\n\n".join(parts + [f"time: {took}"])


def _ms(x: float | None) -> float | None:
    return None if x is None else x * 1e3


def _yes(x: object) -> str:
    return "yes" if x else "NO"


def _correctness(sec: dict[str, Any]) -> str:
    rows = []
    for mode in ("default", "deterministic"):
        for run in ("device", "host", "disk", "handoff"):
            r = sec[mode][run]
            rows.append([mode, run, ",".join(f"{k}:{v}" for k, v in r["served_by"].items()),
                         _yes(r["same_text"]), _yes(r["bit_identical"]),
                         r["max_abs_logit_diff"], "ok" if r["first_token_gate"] is None else "NO"])
    out = (f"correctness: {sec['model']} {sec['dtype']} on {sec['device']}, "
           f"{sec['prompt_tokens']}-token prompt, against its cold run: "
           f"{'PASSED' if sec['passed'] else 'FAILED'}\n"
           + format_table(["mode", "run", "served by", "same text", "same bits",
                           "max |d logit|", "1st-token gate"], rows))
    hf = sec.get("transformers")
    if hf:
        out += (f"\ntransformers (bf16): same top-1 {_yes(hf['same_top1'])}, max |d logit| "
                f"{hf['rel_logit_diff']:.2%} of max (gate {hf['rtol']:.0%}), first "
                f"{hf['tokens_compared']} greedy tokens the same {_yes(hf['same_tokens'])}")
    return out


def _ttft(sec: dict[str, Any]) -> str:
    bw = sec["bandwidth_gbps"]
    modes = sec.get("modes", ["cold", "device", "host", "disk"])
    warm = [m for m in modes if m != "cold"]
    headers = ["tokens", "HF", "cold", "cold/HF"]
    for m in warm:
        headers += [m, "floor", "x floor"]
    headers += ["warm max d", "flips"]
    rows = []
    for r in sec["summary"]:
        row: list[object] = [r["length"], _ms(r.get("peer_s")), _ms(r["cold_s"]),
                             r.get("peer_over_cold")]
        for m in warm:
            row += [_ms(r[f"{m}_s"]), _ms(r[f"{m}_floor_s"]), r[f"{m}_over_floor"]]
        row += [r.get("warm_logits_max_rel"), r.get("warm_tokens_flipped")]
        rows.append(row)
    floors = ", ".join(f"{m} {bw[m]:.1f}" for m in warm)
    head = (f"TTFT ms (medians): transformers, Strata cold, warm beside floors ({floors} GB/s); "
            "warm max d = largest logit gap to cold / largest logit, flips = greedy tokens that "
            "changed (both within the gate)")
    return head + "\n" + format_table(headers, rows)


def _decode(sec: dict[str, Any]) -> str:
    eager = {r["batch"]: r for r in sec["eager"]["rows"]}
    graphs = {r["batch"]: r for r in sec["graphs"]["rows"]} if "graphs" in sec else {}
    rows = []
    for b, e in eager.items():
        g = graphs.get(b)
        best = g or e
        rows.append([b, e["ms_per_step"], g and g["ms_per_step"], best["tokens_per_s"],
                     e["roofline_tokens_per_s"], best["fraction_of_roofline"],
                     best.get("fraction_of_weights_roofline")])
    roof = sec["eager"]["roofline"]
    return (f"decode (prompt {sec['eager']['config']['prompt_tokens']} tokens); roofline = "
            f"{roof['name']} ({roof['copy_bandwidth_gbps']:.0f} GB/s copy) of the bytes a step "
            "reads\n" + format_table(
                ["batch", "eager ms/step", "graph ms/step", "tok/s", "roofline tok/s",
                 "of roofline", "of weights roofline"], rows))


def _determinism(sec: dict[str, Any]) -> str:
    d, base = sec["deterministic"], sec["default"]
    rows = [[what, _ms(base[k]), _ms(d[k]), sec["cost"].get(c)]
            for what, k, c in (("cold TTFT", "cold_s", "cold"),
                               ("warm HBM TTFT", "device_s", "device"),
                               ("warm host TTFT", "host_s", None))]
    for b in sec["batches"]:
        key = str(b) if str(b) in base["decode_ms"] else b
        rows.append([f"decode b{b} ms/step", base["decode_ms"][key], d["decode_ms"][key],
                     sec["cost"][f"decode_b{b}"]])
    return (f"deterministic mode at {sec['length']} tokens (warm runs bit-identical: "
            f"{_yes(sec['bit_identical'])}; it reuses {d['cached_tokens']} cached tokens where "
            f"the default reuses {base['cached_tokens']})\n"
            + format_table(["", "default", "deterministic", "ratio"], rows))


def _disagg(sec: dict[str, Any]) -> str:
    loc, srv = sec["colocated"], sec["disaggregated"]
    rows = [[m, _ms(loc[f"{m}_s"]), _ms(srv[f"{m}_s"]), sec[f"{m}_ratio"]]
            for m in ("cold", "device", "host", "disk")]
    out = (f"disaggregated (service: prefill + decode worker) vs colocated (one engine) TTFT at "
           f"{sec['length']} tokens (warm tokens = cold tokens: {_yes(sec.get('tokens_same'))})\n"
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


def _kernels(sec: dict[str, Any]) -> str:
    if "skipped" in sec:
        return f"kernels: skipped ({sec['skipped']})"
    rows = [[r["case"], r["path"], r["ms"], r.get("tflops"), r.get("gbps"), r.get("max_err")]
            for r in sec["rows"]]
    return (f"kernels on {sec['device']} (median ms, L2 flushed)\n"
            + format_table(["case", "path", "ms", "TFLOP/s", "GB/s", "max err"], rows))


def plot(result: dict[str, Any], path: str) -> None:
    plt = pyplot()
    secs = result["sections"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    ax = axes[0]
    rows = [r for name in ("ttft", "ttft-long") if name in secs for r in secs[name]["summary"]]
    if rows:
        rows.sort(key=lambda r: r["length"])
        xs = [r["length"] for r in rows]
        if any(r.get("peer_s") for r in rows):
            ax.plot(xs, [r.get("peer_s") or float("nan") for r in rows], "k^-",
                    label="transformers")
        for i, mode in enumerate(("cold", "device", "host", "disk")):
            ys = [r.get(f"{mode}_s") or float("nan") for r in rows]
            ax.plot(xs, ys, "o-", color=f"C{i}", label=mode)
            if mode != "cold":
                ax.plot(xs, [r.get(f"{mode}_floor_s") or float("nan") for r in rows], "--",
                        color=f"C{i}", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("TTFT (s)  [dashed: floors]")
        ax.legend(fontsize=7)
    ax.set_title("TTFT")
    ax = axes[1]
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
    cfg = result["config"]
    fig.suptitle(f"strata bench gpu: {cfg['model']} {cfg['dtype']} on {cfg['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
