"""The benchmark suite's outputs: the markdown tables for the README (``headline.md``) and the
plot of test metric against training time (``quality.png``), from the suite's results, and
:func:`render`, which rewrites both from a suite JSON written earlier.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from suite_common import ADMM_RESNET, _finite, _fmt


def _cell(s: dict | None, ratio: bool = True) -> str:
    if not s:
        return "-"
    if s.get("status") in ("error", "diverged", "nonfinite"):
        return str(s["status"])
    text = _fmt(s.get("final_test_metric"), ".3f")
    if ratio:
        if s.get("reached_target"):
            text += f" / {_fmt(s.get('ratio'), '.2g')}x"
        else:
            text += f" / >{_fmt(s.get('ratio_lower_bound'), '.2g')}x"
        if s.get("relaxed_iterations_to_target") is not None:
            text += f" ({_fmt(s.get('relaxed_ratio'), '.2g')}x)"
        else:
            text += f" (>{_fmt(s.get('relaxed_ratio_lower_bound'), '.2g')}x)"
    return text


def headline_markdown(results: dict[str, Any]) -> str:
    """The markdown tables for the README."""
    m = results.get("machine", {})
    lines = [f"# Benchmark headline ({results.get('mode')}, {results.get('timestamp')})", "",
             f"Machine: {m.get('cpu_model', m.get('processor', '?'))}, {m.get('cpus')} CPUs, "
             f"Python {m.get('python')}, numpy {m.get('versions', {}).get('numpy')}, torch "
             f"{m.get('versions', {}).get('torch')}; one process, one BLAS/torch thread. "
             "Shared machine: compare ratios, not seconds.", ""]
    sec = results.get("sections", {})
    q = sec.get("quality")
    if q and "configs" in q:
        lines += ["## Quality: ADMM vs Adam", "",
                  "Cells: final test metric / time-to-target ratio (time to reach the tuned "
                  "Adam's final test metric over Adam's time to reach it; `>x`: not reached "
                  "within the budget (ADMM: the wall time of one full Adam run), x is a lower "
                  "bound) (in brackets: the same ratio for the relaxed target 0.99 x accuracy, "
                  "1.01 x MSE). MSE: lower is better. Adam MLP: final metric of Adam on the MLP "
                  "that dlADMM/pdADMM train (their target).", ""]
        algs = ["sgd", *ADMM_RESNET]
        mlp = any("dladmm (mlp)" in c.get("runs", {}) or "pdadmm (mlp)" in c.get("runs", {})
                  for c in q["configs"])
        head = ["data", "N", "metric", "Adam final (lr, batch)", "Adam time to target [s]",
                "OLS", *algs]
        if mlp:
            head += ["Adam MLP", "dladmm (mlp)", "pdadmm (mlp)"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for c in q["configs"]:
            if "runs" not in c or "adam" not in c.get("runs", {}):
                lines.append(f"| {c.get('data')} | {c.get('depth', '-')} | error: "
                             f"{c.get('error', '?')} |")
                continue
            runs, a = c["runs"], c.get("adam", {})
            ols = c.get("ols", {})
            ols_v = ols.get("test_mse") if c["metric"] == "mse" else ols.get("test_accuracy")
            row = [c["data"], str(c["depth"]), c["metric"],
                   f"{_fmt(c.get('target'), '.3f')} ({a.get('lr', 0):g}, "
                   f"{a.get('batch_size') or 'full'})",
                   _fmt(c.get("adam_time_to_target"), ".2f"), _fmt(ols_v, ".3f")]
            row += [_cell(runs.get(alg)) for alg in algs]
            if mlp:
                row += [_cell(runs.get("adam (mlp)"), ratio=False),
                        _cell(runs.get("dladmm (mlp)")), _cell(runs.get("pdadmm (mlp)"))]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    r = sec.get("roofline")
    if r and "rows" in r:
        p = r["problem"]
        lines += ["## Roofline: RADMM-3 flop rate", "",
                  f"ReLU, N={p['depth']}, n={p['n']}, 1 BLAS thread; matmul "
                  f"{'x'.join(map(str, r['matmul_before']['shape']))}: "
                  f"{r['matmul_gflops']:.1f} Gflop/s. Target: >= 50% at width 512.", "",
                  "| width | Gflop/iteration | s/iteration (min) | Gflop/s | fraction of matmul |",
                  "|---|---|---|---|---|"]
        for row in r["rows"]:
            lines.append(f"| {row['width']} | {row['flops'] / 1e9:.2f} | "
                         f"{_fmt(row['time_min'], '.3f')} | {_fmt(row['gflops'], '.1f')} | "
                         f"{_fmt(100 * row['fraction_of_matmul'], '.0f')}% |")
        lines.append("")
    s = sec.get("scaling")
    if s and "sweeps" in s:
        b = s["base"]
        lines += ["## Scaling: RADMM-3 time per iteration", "",
                  f"Around N={b['depth']}, d={b['width']}, n={b['n']} (ReLU).", "",
                  "| sweep | values | fitted exponent | last two points | expected |",
                  "|---|---|---|---|---|"]
        for axis, sw in s["sweeps"].items():
            lines.append(f"| {axis} | {', '.join(map(str, sw['values']))} | "
                         f"{_fmt(sw['exponent'], '.2f')} | {_fmt(sw['exponent_last_two'], '.2f')}"
                         f" | ~{sw['expected']:g} |")
        lines.append("")
    g = sec.get("gradients")
    if g and "rows" in g:
        lines += ["## Exploding gradients: residual_scale = 1, ReLU, no normalisation", "",
                  f"{g['data']}; {g['setup']}.", "",
                  "At initialisation (loss, gradient norms of the first and last layer, growth of "
                  "the RMS of the block outputs from the first to the last) with "
                  "residual_scale 1, and with the project default in brackets.", "",
                  "| N | loss at init | grad W1 / grad WN at init | activation growth | "
                  "Adam final (status) | RADMM-3 final (status) |", "|---|---|---|---|---|---|"]
        for row in g["rows"]:
            ig = row.get("init_gradients", {})
            ref = next((v for k, v in row.items() if k.startswith("init_gradients_scale")), {})
            ad, rd = row.get("adam", {}), row.get("radmm3", {})

            def outcome(r: dict) -> str:
                text = f"{_fmt(r.get('final_test_metric'), '.3f')} ({r.get('status')})"
                if r.get("error"):
                    text += f": {r['error'][:70]}"
                return text

            lines.append(
                f"| {row['depth']} | {_fmt(ig.get('loss'), '.3g')} "
                f"({_fmt(ref.get('loss'), '.3g')}) | "
                f"{_fmt(ig.get('grad_norm_first'), '.3g')} / "
                f"{_fmt(ig.get('grad_norm_last'), '.3g')} "
                f"({_fmt(ref.get('grad_norm_first'), '.3g')} / "
                f"{_fmt(ref.get('grad_norm_last'), '.3g')}) | "
                f"x{_fmt(ig.get('activation_growth'), '.3g')} "
                f"(x{_fmt(ref.get('activation_growth'), '.3g')}) | "
                f"{outcome(ad)} | {outcome(rd)} |")
        lines.append("")
    errors = results.get("errors", [])
    if errors:
        lines += ["## Errors", ""] + [f"- {e}" for e in errors] + [""]
    return "\n".join(lines)


_STYLE = {"adam": ("k", "-"), "sgd": ("0.55", "-"), "radmm3": ("C0", "-"),
          "radmm3l": ("C1", "-"), "radmm2": ("C2", "-"), "adam (mlp)": ("k", "--"),
          "dladmm (mlp)": ("C3", "--"), "pdadmm (mlp)": ("C4", "--")}


def plot_quality(quality: dict[str, Any], path: Path) -> Path | None:
    """Test metric against training time, one panel per data set and depth."""
    configs = [c for c in quality.get("configs", []) if c.get("curves")]
    if not configs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(c["data"] for c in configs))
    depths = sorted({c["depth"] for c in configs})
    width = max(8.0, 3.6 * len(depths))
    fig, axes = plt.subplots(len(datasets), len(depths), squeeze=False,
                             figsize=(width, 2.9 * len(datasets) + 0.6))
    for c in configs:
        ax = axes[datasets.index(c["data"])][depths.index(c["depth"])]
        ys = []
        for label, (color, ls) in _STYLE.items():
            cur = c["curves"].get(label)
            if not cur:
                continue
            x = np.array(cur["train_time"], dtype=float)
            y = np.array([np.nan if v is None else v for v in cur["test_metric"]], dtype=float)
            name = label
            if label == "adam" and c.get("adam"):
                name = f"adam (lr {c['adam']['lr']:g})"
            ax.plot(x, y, color=color, ls=ls, lw=1.3, label=name)
            ys.extend(y[np.isfinite(y)].tolist())
        tgt = c.get("target")
        if _finite(tgt):
            ax.axhline(tgt, color="k", ls=":", lw=0.8)
        if c["metric"] == "mse":
            ref = c.get("ols", {}).get("mean_mse")
            top = 1.3 * ref if _finite(ref) else (np.nanpercentile(ys, 90) if ys else 1.0)
            low = 0.9 * min(ys) if ys else 0.0
            if top > low:
                ax.set_ylim(low, top)
        else:
            ax.set_ylim(max(0.0, min(ys) - 0.02) if ys and min(ys) > 0.5 else 0.0, 1.0)
        ax.set_title(f"{c['data']}, N={c['depth']}", fontsize=9)
        ax.set_xlabel("train time [s]", fontsize=8)
        ax.set_ylabel(f"test {c['metric']}", fontsize=8)
        ax.tick_params(labelsize=7)
    handles, labels = {}, {}
    for row in axes:
        for ax in row:
            for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
                key = lab.split(" (lr")[0]
                handles.setdefault(key, h)
                labels.setdefault(key, key)
    fig.legend(list(handles.values()), list(labels.values()), loc="lower center",
               ncol=min(int(width // 1.6), len(handles)), fontsize=8, frameon=False)
    fig.suptitle("test metric vs training time (dotted: target = tuned Adam's final)", fontsize=10)
    fig.tight_layout(rect=(0, 0.09 if len(handles) > int(width // 1.6) else 0.05, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def render(path: Path, out: Path) -> list[Path]:
    """Rewrite ``headline.md`` (and ``quality.png``) in ``out`` from a suite JSON."""
    results = json.loads(Path(path).read_text())
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "headline.md"]
    written[0].write_text(headline_markdown(results))
    quality = results.get("sections", {}).get("quality")
    if quality and plot_quality(quality, out / "quality.png") is not None:
        written.append(out / "quality.png")
    return written
