"""The reporting side of `deltaprop bench`: a report (the dict ``bench.measure`` returns) as a text table,
a JSON file and a PNG plot. Files are written atomically: never a half-written report."""

from __future__ import annotations

import json

from deltaprop.atomic import write_atomic
from deltaprop.benchmarks.workload import step_flops


def format_table(headers, rows, left=1) -> str:
    """Columns padded to their widest cell; the first ``left`` columns left-aligned, the others right-aligned."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    lines = []
    for cells in [headers, *rows]:
        lines.append("  ".join(str(c).ljust(w) if i < left else str(c).rjust(w)
                               for i, (c, w) in enumerate(zip(cells, widths))).rstrip())
    return "\n".join(lines)


def blas_threads(pool: dict) -> str:
    """A BLAS pool's thread count as words ("2 threads"; unknown for a BLAS threadpoolctl cannot read)."""
    return "thread count unknown" if pool["threads"] is None else f"{pool['threads']} threads"


def _ms(value: float) -> str:
    return f"{value:.3g}" if value < 1 else f"{value:,.1f}" if value < 1000 else f"{value:,.0f}"


def render(report: dict) -> str:
    """The report as text: the header, the step table, the kernel table (with --kernels) and the footnotes."""
    w, m = report["workload"], report["machine"]
    net = f"{w['preset']} " if w["preset"] else ""
    blas = "; ".join(f"{b['name']} {b['version'] or ''} ({blas_threads(b)})" for b in m["blas"]) or "none found"
    gpus = "; ".join(f"{g['name']} (driver {g['driver']})" for g in m["gpus"]) or "no GPU"
    lines = [
        f"deltaprop bench: {net}{'-'.join(map(str, w['sizes']))} {w['activation']}, softmax cross-entropy, SGD, {w['dtype']}",
        f"machine: {m['cpu']}, {m['cores']} cores, BLAS {blas}, {gpus}"
        + (f", load average {m['load_average'][0]:.1f} at the start" if m["load_average"] else ""),
    ]
    for device in dict.fromkeys(p["device"] for p in report["peaks"]):
        rows = [p for p in report["peaks"] if p["device"] == device]
        lines.append(f"GEMM peak, {device} ({rows[0]['backend']}, {rows[0]['dtype']} {rows[0]['n']}^3, in each batch's rounds): "
                     + ", ".join(f"{p['gflops']:,.1f} at batch {p['batch']}" for p in rows) + " GFLOP/s")
    compiled = [f"{s['name']} {s['compile_s']:.2f} s" for s in report["subjects"] if s["compile_s"] is not None]
    lines.append("compile (warmup(), not in any time below): " + ", ".join(compiled))
    if report["not_run"]:
        lines.append("not run here: " + "; ".join(f"{n['name']} ({n['reason']})" for n in report["not_run"]))
    headers = ["backend", "device", "batch", "ms/step", "IQR ms", "samples/s", "GFLOP/s", "% peak",
               "vs peer", "1st step ms"]
    rows = []
    for s in sorted(report["steps"], key=lambda r: (r["batch"], r["kind"] != "backend")):
        t = s["timing"]
        rows.append([s["subject"], s["device"], s["batch"], _ms(t["median_ms"]), f"{_ms(t['q1_ms'])}-{_ms(t['q3_ms'])}",
                     f"{s['samples_per_s']:,.0f}", f"{s['gflops']:,.1f}",
                     "" if s["peak_fraction"] is None else f"{100 * s['peak_fraction']:.0f}%",
                     "" if s["vs_fastest_peer"] is None else f"{s['vs_fastest_peer']:.2f}x",
                     _ms(s["first_step_ms"])])
    lines += ["", format_table(headers, rows, left=2)]
    if report["kernels"]:
        lines += ["", render_kernels(report)]
    sizes = w["sizes"]
    fewest, most = (f(s["timing"]["rounds"] for s in report["steps"]) for f in (min, max))
    lines += [
        "",
        f"ms/step: median of {fewest if fewest == most else f'{fewest}-{most}'} interleaved rounds (each sample the mean of several steps);"
        " IQR: its 25th-75th percentiles.",
        f"GFLOP/s: the FLOPs a step needs, 2*B*(3*sum(n_l*n_(l-1)) - n_0*n_1) = B * {step_flops(sizes, 1):,};"
        " the input gets no gradient, so the first layer has no input-gradient GEMM; elementwise work is not counted.",
        "% peak: GFLOP/s over the GEMM peak measured in the same rounds on the same device.",
        "vs peer: the fastest peer's (torch, jax) median on the same device divided by this median (above 1x: faster).",
        "1st step: the first step at this batch size (allocation, JAX's jit compile), apart from ms/step.",
    ]
    return "\n".join(lines)


def render_kernels(report: dict) -> str:
    """Per backend and batch, each kernel's summed median over its calls in a step, and its share of the step."""
    step_ms = {(s["subject"], s["batch"]): s["timing"]["median_ms"] for s in report["steps"]}
    groups = {}
    for k in report["kernels"]:
        key = (k["subject"], k["batch"], k["kernel"], k["role"])
        calls, ms, flops = groups.get(key, (0, 0.0, 0))
        groups[key] = (calls + 1, ms + k["timing"]["median_ms"], flops + (k["flops"] or 0))
    rows = [[name, batch, kernel, role, calls, _ms(ms), f"{flops / ms / 1e6:,.1f}" if flops else "",
             f"{100 * ms / step_ms[name, batch]:.0f}%"]
            for (name, batch, kernel, role), (calls, ms, flops) in groups.items()]
    for name, batch in step_ms:
        total = sum(ms for (n, b, _, _), (_, ms, _) in groups.items() if (n, b) == (name, batch))
        if total:
            rows.append([name, batch, "all kernels", "", "", _ms(total), "", f"{100 * total / step_ms[name, batch]:.0f}%"])
    rows.sort(key=lambda r: (r[0], r[1]))
    headers = ["backend", "batch", "kernel", "role", "calls", "ms", "GFLOP/s", "% of step"]
    return "each kernel alone (median ms summed over its calls in one step):\n" + format_table(headers, rows, left=4)


def write_json(report: dict, path: str) -> None:
    text = json.dumps(report, indent=1, allow_nan=False) + "\n"
    write_atomic(path, lambda file: file.write(text.encode()), argument="--json")


def plot(report: dict, path: str) -> None:
    """samples/s against batch size, log axes, one line per backend (solid) and peer (dashed); a PNG at ``path``."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    for subject in report["subjects"]:
        rows = sorted((s for s in report["steps"] if s["subject"] == subject["name"]), key=lambda r: r["batch"])
        ax.plot([r["batch"] for r in rows], [r["samples_per_s"] for r in rows], marker="o",
                linestyle="-" if subject["kind"] == "backend" else "--", label=f"{subject['name']} ({subject['device']})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(report["workload"]["batches"], labels=[str(b) for b in report["workload"]["batches"]])
    ax.minorticks_off()
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("samples / s (training step)")
    w, m = report["workload"], report["machine"]
    gpus = ", ".join(g["name"] for g in m["gpus"])
    ax.set_title(f"{'-'.join(map(str, w['sizes']))} {w['activation']}, {w['dtype']}: {m['cpu']}, {m['cores']} cores"
                 + (f", {gpus}" if gpus else ""), fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    write_atomic(path, lambda file: fig.savefig(file, format="png", dpi=120), argument="--plot")
