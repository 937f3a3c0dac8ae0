"""Writes a benchmark run to disk: results.json (everything), results.md (tables per op) and
matplotlib PNG plots (time vs size per op and sweep; peak memory vs batch size where cases have one)."""
from __future__ import annotations

import json
import logging
import math
import re
from collections import defaultdict
from pathlib import Path

log = logging.getLogger("wmkernels")

_MIB = 1 << 20


def _f(x, fmt: str, scale: float = 1.0) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x * scale, fmt)


def _pct(x) -> str:
    return _f(x, ".0f", 100.0) + ("%" if x is not None else "")


def _ratio(x) -> str:
    return _f(x, ".2f") + ("x" if x is not None else "")


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=1, sort_keys=False, default=str) + "\n")


def _machine_lines(payload: dict) -> list[str]:
    m = payload["machine"]
    lines = [f"- device: **{m.get('device_name')}** ({m.get('cpu_model')}, {m.get('cpu_count')} CPU cores, "
             f"{m.get('torch_threads')} torch threads)",
             f"- torch {m.get('torch')}, triton {m.get('triton')}, python {m.get('python')}, "
             f"commit `{m.get('git_commit') or 'unknown'}`, {payload['date']}"]
    if m.get("loadavg_start") is not None:
        lines.append(f"- load average (1 min) at start / end: {m['loadavg_start']:.1f} / {m.get('loadavg_end', 0):.1f} "
                     f"on {m.get('cpu_count')} cores (other processes share the machine when this exceeds ~0)")
    for label, run in payload["runs"].items():
        rl = run["roofline"]
        mm = ", ".join(f"{k} {v:.3g}" for k, v in rl.get("matmul_tflops", {}).items())
        lines.append(f"- allocator `{label}`: {run['allocator_desc']}; roofline measured in this run: "
                     f"copy **{rl['copy_gbps']:.1f} GB/s** (read+write), matmul TFLOP/s: {mm}")
    over = _over_roofline(payload)
    if over:
        rl = payload["roofline"]
        size = f" ({rl['copy_bytes'] / 2**20:.0f} MiB)" if rl.get("copy_bytes") else ""
        lines.append(f"- {over} contender result(s) exceed 100% of a roofline, which is then no ceiling for them: "
                     f"copy bandwidth is measured on a buffer larger than the caches{size}, so a case whose bytes "
                     "fit in cache can beat it; the matmul peak is one square product timed in this run (low when "
                     "the machine is shared); contrastive counts the eager formula's FLOPs")
    lines.append(f"- memory: {payload.get('memory_method', '')}")
    lines.append(f"- timing: median of {payload['config']['rounds']} interleaved rounds (order rotated each "
                 f"round) after warm-up, IQR = interquartile range; every contender checked equal to the "
                 f"reference before timing")
    return lines


def _over_roofline(payload: dict) -> int:
    """How many contender results exceed 100% of the bandwidth or matmul roofline."""
    return sum(1 for c in payload["cases"] for r in c["contenders"].values()
               if any((r.get(k) or 0) > 1.0 for k in ("bw_fraction", "flops_fraction")))


def _roofline_fraction(r: dict):
    """The binding roofline: the larger of the bandwidth and the matmul-peak fractions."""
    fracs = [f for f in (r.get("bw_fraction"), r.get("flops_fraction")) if f is not None]
    return max(fracs) if fracs else None


def _summary(cases: list[dict]) -> list[str]:
    """The fastest wmkernels contender of each case (checked ones first); failed or raising
    wmkernels contenders and case errors get a row saying so, not silence."""
    rows = []
    for c in cases:
        ours = {n: r for n, r in c["contenders"].items() if n.startswith("wmkernels")}
        timed = {n: r for n, r in ours.items() if r.get("status") in ("ok", "unchecked") and r.get("median_s")}
        if timed:  # checked ones first: an unchecked time (the reference failed) only where none is checked
            name = min(timed, key=lambda n: (timed[n]["status"] != "ok", timed[n]["median_s"]))
            r = timed[name]
            label = name if r["status"] == "ok" else f"{name} (**unchecked**: {c['reference']} failed)"
            vs_eager = _ratio(r.get("speedup_vs_eager"))
            if r.get("speedup_vs_eager") is None and r.get("speedup_vs_reference") is not None:
                vs_eager = f"{_ratio(r['speedup_vs_reference'])} vs {c['reference']}"  # e.g. train: vs bare-loop
            rows.append(f"| {c['op']} | {c['name']} | {label} | {_f(r['median_s'], '.3f', 1e3)} | "
                        f"{vs_eager} | {_ratio(r.get('speedup_vs_compile'))} | "
                        f"{_pct(r.get('floor_fraction'))} | {_pct(_roofline_fraction(r))} |")
        failed = [f"**{n} {r.get('status')}**" for n, r in ours.items() if r.get("status") not in ("ok", "unchecked")]
        if c.get("status") != "ok":
            failed = [f"**case error**: {c.get('error', '')}"]
        if failed:
            rows.append(f"| {c['op']} | {c['name']} | " + ", ".join(failed).replace("|", "\\|") + " | – | – | – | – | – |")
    if not rows:
        return []
    return ["| op | case | fastest wmkernels | ms | vs eager | vs compile | % of floor | % of roofline |",
            "|---|---|---|---:|---:|---:|---:|---:|", *rows, ""]


def _table(cases: list[dict]) -> list[str]:
    has_bytes = any(c.get("bytes_moved") for c in cases)
    has_flops = any(c.get("flops") for c in cases)
    has_floor = any(c.get("floor") for c in cases)
    refs = sorted({c["reference"] for c in cases if c.get("reference") not in (None, "eager")})
    head = ["case", "contender", "median ms", "IQR ms", "min ms", "vs eager", "vs compile"]
    if refs:
        head += [f"vs {'/'.join(refs)}"]
    if has_bytes:
        head += ["GB/s", "% copy BW"]
    if has_flops:
        head += ["TFLOP/s", "% matmul peak"]
    if has_floor:
        head += ["% of floor"]
    head += ["peak extra MiB", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i < 2 or h == "status" else "---:"
                                                             for i, h in enumerate(head)) + "|"]
    for c in cases:
        if c["status"] != "ok":
            lines.append(f"| {c['name']} | – | " + " | ".join(["–"] * (len(head) - 3)) + f" | error: {c['error']} |")
            continue
        rows = list(c["contenders"].items())
        if c.get("floor"):
            rows.append(("(memory floor)", {**c["floor"], "status": "ok", "floor_row": True}))
        for name, r in rows:
            ok = r.get("status") in ("ok", "unchecked")
            cells = [c["name"], name]
            if ok:
                cells += [_f(r["median_s"], ".3f", 1e3), f"{_f(r['q1_s'], '.3f', 1e3)}–{_f(r['q3_s'], '.3f', 1e3)}",
                          _f(r["min_s"], ".3f", 1e3), _ratio(r.get("speedup_vs_eager")), _ratio(r.get("speedup_vs_compile"))]
            else:
                cells += ["–"] * 5
            if refs:
                cells += [_ratio(r.get("speedup_vs_reference")) if ok and c["reference"] != "eager" else "–"]
            if has_bytes:
                cells += [_f(r.get("gbps"), ".1f"), _pct(r.get("bw_fraction"))] if ok else ["–", "–"]
            if has_flops:
                cells += [_f(r.get("tflops"), ".3g"), _pct(r.get("flops_fraction"))] if ok else ["–", "–"]
            if has_floor:
                cells += [_pct(r.get("floor_fraction")) if ok else "–"]
            cells += [_f(r.get("peak_extra_bytes"), ".1f", 1 / _MIB)]
            status = r.get("status", "")
            if status != "ok":
                status = f"**{status}**: {r.get('error', '')}"
            elif r.get("floor_row"):
                status = "reference point, not checked"
            cells.append(status.replace("|", "\\|"))
            lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def write_markdown(path: Path, payload: dict) -> None:
    lines = [f"# wmkernels benchmark: {payload['machine']['device_name']}, {payload['date']}", ""]
    lines += _machine_lines(payload) + [""]
    lines += ["Command: `" + payload["config"]["command"] + "`", ""]
    primary = payload["primary_run"]
    summary = _summary([c for c in payload["cases"] if c["allocator"] == primary])
    if summary:
        lines += [f"## Summary (allocator `{primary}`)", ""] + summary
    by_op = defaultdict(list)
    for c in payload["cases"]:
        by_op[(c["op"], c["allocator"])].append(c)
    for (op, alloc), cases in by_op.items():
        lines += [f"## {op} (allocator `{alloc}`)", ""] + _table(cases)
    for op, why in payload.get("skipped_ops", {}).items():
        lines += [f"- {op}: skipped ({why})"]
    if payload.get("plots"):
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in payload["plots"]]
    path.write_text("\n".join(lines) + "\n")


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", s).strip("-") or "all"


_BATCH_KEYS = ("batch", "batch_size", "B")
_NOT_SERIES = {"shape", "size", "steps", *_BATCH_KEYS}


def _batch(case: dict):
    return next((case["params"][k] for k in _BATCH_KEYS if case["params"].get(k) is not None), None)


def _series(case: dict) -> str | None:
    """Cases without a `sweep` form a series with the cases whose other parameters are equal."""
    rest = {k: v for k, v in case["params"].items() if k not in _NOT_SERIES}
    return " ".join(f"{k}={v}" for k, v in sorted(rest.items())) or None


def write_plots(out_dir: Path, payload: dict) -> list[str]:
    """PNG plots; returns the file names (none, with a log message, when matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("wmkernels.bench: matplotlib not installed, no plots")
        return []
    files = []
    primary = payload["primary_run"]
    copy = payload["runs"][primary]["roofline"]["copy_gbps"]
    groups = defaultdict(list)
    for c in payload["cases"]:
        if c["allocator"] == primary and c["status"] == "ok":
            groups[(c["op"], c.get("sweep") or _series(c))].append(c)
    swept_ops = {c["op"] for c in payload["cases"] if c.get("sweep")}
    for (op, sweep), cases in groups.items():
        if (op in swept_ops and not any(c.get("sweep") for c in cases)) or len({c["size"] for c in cases}) < 2:
            continue
        cases.sort(key=lambda c: c["size"])
        with_bw = all(c.get("bytes_moved") for c in cases)
        fig, axes = plt.subplots(1, 2 if with_bw else 1, figsize=(11 if with_bw else 6, 4.2), squeeze=False)
        names = sorted({n for c in cases for n in c["contenders"]})
        series = [(n, [(c["size"], c["contenders"][n]) for c in cases if c["contenders"].get(n, {}).get("median_s")])
                  for n in names]
        floor = [(c["size"], c["floor"]) for c in cases if c.get("floor")]
        for n, pts in series + ([("memory floor", floor)] if floor else []):
            if not pts:
                continue
            style = "k--" if n == "memory floor" else "o-"
            xs = [p[0] for p in pts]
            axes[0][0].plot(xs, [p[1]["median_s"] * 1e3 for p in pts], style, label=n)
            if with_bw:
                bytes_by_size = {c["size"]: c["bytes_moved"] for c in cases}
                axes[0][1].plot(xs, [bytes_by_size[x] / p["median_s"] / 1e9 for x, p in pts], style, label=n)
        ax = axes[0][0]
        ax.set(xscale="log", yscale="log", xlabel="size (elements)", ylabel="median time, ms (fwd+bwd)",
               title=f"{op}{' ' + sweep if sweep else ''}: time vs size")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        if with_bw:
            ax = axes[0][1]
            ax.axhline(copy, color="grey", linestyle=":", label=f"copy bandwidth {copy:.1f} GB/s")
            ax.set(xscale="log", xlabel="size (elements)", ylabel="effective GB/s", title=f"{op}: achieved bandwidth")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(payload["machine"]["device_name"], fontsize=9)
        fig.tight_layout()
        name = f"{_slug(op)}-{_slug(sweep or 'all')}-time.png"
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        files.append(name)
    for (op, sweep), cases in groups.items():
        pts = [c for c in cases if _batch(c) is not None]
        if len({_batch(c) for c in pts}) < 2:
            continue
        pts.sort(key=_batch)
        fig, ax = plt.subplots(figsize=(6, 4.2))
        for n in sorted({n for c in pts for n in c["contenders"]}):
            xy = [(_batch(c), c["contenders"][n]["peak_extra_bytes"] / _MIB) for c in pts
                  if c["contenders"].get(n, {}).get("peak_extra_bytes") is not None]
            if xy:
                ax.plot(*zip(*xy), "o-", label=n)
        ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="peak extra memory, MiB",
               title=f"{op}{' ' + sweep if sweep else ''}: memory vs batch size")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        name = f"{_slug(op)}-{_slug(sweep or 'all')}-memory.png"
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        files.append(name)
    return files


def write_all(out_dir: Path, payload: dict, plots: bool = True) -> list[str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    payload["plots"] = write_plots(out_dir, payload) if plots else []
    write_json(out_dir / "results.json", payload)
    write_markdown(out_dir / "results.md", payload)
    return ["results.json", "results.md", *payload["plots"]]
