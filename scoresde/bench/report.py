"""Benchmark reports: `<suite>.json` (everything), `<suite>.md` (tables with a fixed layout,
included by docs/benchmarks.md) and `<suite>.png` (error against NFE, log-log)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

__all__ = ["write_report", "markdown"]


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v != 0 and abs(v) < 10**-(digits):
            return f"{v:.1e}"
        return f"{v:.{digits}f}"
    return str(v)


def _sde_label(block: dict) -> str:
    sde = block.get("sde", "own")
    return "" if sde == "own" else f", {sde.upper()} SDE"


def _floor(fl: dict, key: str) -> str:
    rng = fl.get(f"{key}_range")
    text = _fmt(fl[key])
    return f"{text} ({_fmt(rng[0])}-{_fmt(rng[1])})" if rng else text


def _methods_in_order(rows: list[dict]) -> list[str]:
    seen: list[str] = []
    for r in rows:
        if r["method"] not in seen:
            seen.append(r["method"])
    return seen


def _matrix(block: dict, steps: list[int], key: str, with_nfe: bool) -> list[str]:
    """One row per method, one column per step count (plus "adaptive"): `value (NFE)`."""
    rows = block["rows"]
    cols = [str(s) for s in steps] + ["adaptive"]
    lines = ["| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name in _methods_in_order(rows):
        cells = []
        mine = [r for r in rows if r["method"] == name]
        if key == "ode_err" and not any("ode_err" in r for r in mine):
            continue
        for c in cols:
            step = None if c == "adaptive" else int(c)
            hit = [r for r in mine if r["steps"] == step]
            if not hit:
                cells.append("")
                continue
            r = hit[0]
            if "error" in r:
                cells.append("fails")
            elif not r.get("finite", True):
                cells.append("NaN")
            else:
                val = _fmt(r.get(key))
                cells.append(f"{val} ({r['nfe']})" if with_nfe else val)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


BUDGETS = (5, 10, 20, 50, 100, 200, 1000)


def _ok(r: dict) -> bool:
    return "error" not in r and r.get("finite", False)


def _best(rows: list[dict], budget: int, key) -> dict | None:
    """The row with the smallest key(row) among those with NFE <= budget."""
    fit = [r for r in rows if _ok(r) and r["nfe"] <= budget and key(r) is not None]
    return min(fit, key=key) if fit else None


def _cell(r: dict | None, value: float | None) -> str:
    if r is None:
        return "- | - | -"
    steps = "adaptive" if r["steps"] is None else r["steps"]
    return f"{r['method']} ({steps} steps) | {r['nfe']} | {_fmt(value, 4)}"


def best_per_budget(block: dict, budgets=BUDGETS) -> list[dict[str, Any]]:
    """Per NFE budget: the best scoresde method and the best peer, by ode_err (deterministic
    methods) and by |NLL - the mixture's entropy| (stochastic methods; the NLL of one fresh
    true set where the entropy was not computed)."""
    true_nll = _true_nll(block)
    out = []
    for budget in budgets:
        entry: dict[str, Any] = {"budget": budget}
        for kind, deterministic in (("ode", True), ("sde", False)):
            rows = [r for r in block["rows"] if ("ode_err" in r) == deterministic]
            if deterministic:

                def key(r):
                    return r.get("ode_err")
            else:

                def key(r):
                    return abs(r["nll"] - true_nll) if "nll" in r else None

            mine = [r for r in rows if r.get("family") == "scoresde"]
            peers = [r for r in rows if r.get("family") != "scoresde"]
            entry[f"{kind}_scoresde"] = _best(mine, budget, key)
            entry[f"{kind}_peer"] = _best(peers, budget, key)
        out.append(entry)
    return out


def _true_nll(block: dict) -> float:
    fl = block["floor"]
    return fl.get("nll_population", fl["nll"])


def _summary_md(block: dict) -> list[str]:
    """The "which solver, how many steps, how good" tables of one block."""
    budgets = best_per_budget(block)
    true_nll = _true_nll(block)
    out = [
        "### Best per NFE budget: deterministic samplers (ode_err, lower is better)",
        "",
        "| NFE budget | best scoresde (steps) | NFE | ode_err | best peer (steps) | NFE | ode_err "
        "| peer / scoresde |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in budgets:
        a, b = e["ode_scoresde"], e["ode_peer"]
        ratio = _fmt(b["ode_err"] / a["ode_err"], 1) if a and b and a["ode_err"] > 0 else "-"
        out.append(
            f"| {e['budget']} | {_cell(a, a and a['ode_err'])} | "
            f"{_cell(b, b and b['ode_err'])} | {ratio} |"
        )
    out += [
        "",
        f"### Best per NFE budget: stochastic samplers (|NLL - {_fmt(true_nll, 4)}|, the "
        "mean NLL of true samples; lower is better; one set's NLL has a standard error of "
        f"{_fmt(block['floor']['nll_se'], 3)})",
        "",
        "| NFE budget | best scoresde (steps) | NFE | abs NLL gap | best peer (steps) | NFE "
        "| abs NLL gap |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in budgets:
        a, b = e["sde_scoresde"], e["sde_peer"]
        gap_a = a and abs(a["nll"] - true_nll)
        gap_b = b and abs(b["nll"] - true_nll)
        out.append(f"| {e['budget']} | {_cell(a, gap_a)} | {_cell(b, gap_b)} |")
    return out + [""]


def _accuracy_md(results: dict) -> list[str]:
    out = []
    steps = results["steps"]
    for block in results["targets"]:
        fl = block["floor"]
        out += [
            f"## {block['target']}{_sde_label(block)} (D = {block['dim']}, {block['n']} samples, "
            f"seed {block['seed']})",
            "",
            "True samples against fresh data (the floor; mean and range over "
            f"{fl.get('repeats', 1)} fresh sets): "
            f"NLL {_fmt(fl['nll'])} +- {_fmt(fl['nll_se'])}"
            + (
                f" (entropy of the mixture, 200,000 samples: {_fmt(fl['nll_population'], 4)})"
                if "nll_population" in fl
                else ""
            )
            + ", "
            f"sliced W2 {_floor(fl, 'sw2')}, mode-weight TV {_floor(fl, 'mode_tv')}"
            + (f", Frechet {_floor(fl, 'frechet')}" if "frechet" in fl else "")
            + ".",
            "",
            *_summary_md(block),
            "### ode_err (NFE): RMS distance to a dopri5 rtol=1e-10 float64 solve from the "
            "same x_T",
            "",
            *_matrix(block, steps, "ode_err", True),
            "",
            "### NLL of the samples under the true density (NFE)",
            "",
            *_matrix(block, steps, "nll", True),
            "",
            "### sliced W2 against fresh data",
            "",
            *_matrix(block, steps, "sw2", False),
            "",
            "### mode-weight error (total variation)",
            "",
            *_matrix(block, steps, "mode_tv", False),
            "",
        ]
        if "frechet" in fl:
            out += ["### Frechet distance", "", *_matrix(block, steps, "frechet", False), ""]
        errors = [r for r in block["rows"] if "error" in r]
        if errors:
            out += (
                ["Failures:", ""]
                + [f"- {r['method']} at {r['steps']} steps: {r['error']}" for r in errors]
                + [""]
            )
    return out


def _overhead_md(results: dict) -> list[str]:
    ov = results["overhead"]
    out = [
        f"## Per-step overhead (trivial model score = -x, batch {ov['batch']} x 2, "
        f"{ov['dtype']}, {ov['num_steps']} steps, fastest of >= {ov['repeats']} rounds)",
        "",
        f"Bare torch update (x <- a x + b (-x)): {_fmt(ov['bare_us_per_step'], 1)} us per step"
        + (
            f"; the same plus one torch.randn of the batch (the floor of a stochastic step): "
            f"{_fmt(ov['bare_noise_us_per_step'], 1)} us."
            if "bare_noise_us_per_step" in ov
            else "."
        ),
        f"Clock: {ov.get('clock', 'wall time')}. "
        "Times are the fastest of the rounds (the machine is shared; a method and its "
        "references are timed in turn in each round, for at least the given number of rounds "
        "and then, up to 4x as many, until no side's fastest time improves by over 1 % for a "
        "third of them); medians and round counts in the JSON.",
        "",
    ]
    if "bare_multistep_us_per_step" in ov:
        ms = ov["bare_multistep_us_per_step"]
        line = (
            "'Same update': a bare torch loop doing the same work per step - one bare update "
            "per score evaluation (plus one torch.randn each for stochastic methods), or for "
            "DPM-Solver++ kM the plain multistep update x <- r x + sum_j w_j d_j over k past "
            f"data predictions (2M: {_fmt(ms['2'], 1)} us, 3M: {_fmt(ms['3'], 1)} us)"
        )
        if "bare_rk4_us_per_step" in ov:
            line += (
                f"; for RK4 four bare updates as slopes plus the three stage axpys and the "
                f"weighted combination ({_fmt(ov['bare_rk4_us_per_step'], 1)} us); for PC "
                "with the Langevin corrector the predictor's noisy update plus the corrector's "
                "(score, randn, the batch-mean norms of z and s, the step size, "
                f"x + e s + sqrt(2e) z) ({_fmt(ov['bare_pc_us_per_step'], 1)} us)"
            )
        out += [line + ".", ""]
    out += [
        "| method | stochastic | us per step | ratio to bare | ratio to bare + randn "
        "| ratio to the same update (which) | NFE per step |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in ov["rows"]:
        if "error" in r:
            out.append(f"| {r['method']} | | fails | | | | |")
        else:
            noise = _fmt(r["ratio_to_bare_noise"], 2) if "ratio_to_bare_noise" in r else "-"
            same = (
                f"{_fmt(r['ratio_to_same_update'], 2)} ({r['same_update']})"
                if "ratio_to_same_update" in r
                else "-"
            )
            out.append(
                f"| {r['method']} | {'yes' if r.get('stochastic') else 'no'} "
                f"| {_fmt(r['us_per_step'], 1)} | {_fmt(r['ratio_to_bare'], 1)}"
                f" | {noise} | {same} | {_fmt(r['nfe_per_step'], 2)} |"
            )
    return out + [""]


def _likelihood_md(results: dict) -> list[str]:
    out = []
    for block in results["likelihood"]:
        out += [
            f"## {block['target']} (D = {block['dim']}, {block['n']} true samples, "
            f"eps = {block['eps']:g})",
            "",
            f"Exact mean NLL: {_fmt(block['exact_mean_nll_p0'], 4)} under p_0, "
            f"{_fmt(block['exact_mean_nll_p_eps'], 4)} under p_eps.",
            "",
            "Errors in nats, per sample, against the exact log p_eps (what a user gets: solver "
            "error plus the N(0, I) prior's mismatch with p_T) and against a rtol=atol="
            f"{block.get('tight_rtol', 1e-9):g} solve of the same ODE (the solver's error "
            "alone). NFE: batch calls of the score (for the per-sample solver, the hardest "
            "sample's); evals/sample: score evaluations per sample.",
            "",
            "| method | setting | NFE | evals/sample | mean abs err vs log p_eps | max abs err "
            "| mean abs err vs tight solve | max | std of err | bias vs log p_0 | seconds |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in block["rows"]:
            if "error" in r:
                out.append(f"| {r['method']} | {r['setting']} | fails: {r['error']} |" + " |" * 8)
                continue
            e, z = r["vs_p_eps"], r["vs_p_0"]
            tight = r.get("vs_tight", {})
            out.append(
                f"| {r['method']} | {r['setting']} | {r['nfe']} "
                f"| {_fmt(r.get('evals_per_sample'), 1)} "
                f"| {_fmt(e.get('mean_abs_err'), 4)} | {_fmt(e['max_abs_err'], 4)} "
                f"| {_fmt(tight.get('mean_abs_err'), 4)} | {_fmt(tight.get('max_abs_err'), 4)} "
                f"| {_fmt(e.get('std'), 4)} | {_fmt(z['bias'], 4)} | {_fmt(r['seconds'], 2)} |"
            )
        out.append("")
    return out


def _time_variables_md(blocks: list[dict]) -> list[str]:
    if not blocks:
        return []
    out = [
        "## The time variable: t against sigma / alpha",
        "",
        '`log_likelihood(trace="exact", method="dopri5")` with `time_variable="t"` '
        '(the default) and `"sigma"` (the exact change of variables to EDM\'s ODE). Errors in '
        "nats against the exact log p_eps (mixtures) or the trained network's float64 "
        "reference solve (see above).",
        "",
        "| target | SDE | points | dtype | rtol=atol | NFE (t) | mean abs err (t) | max (t) "
        "| NFE (sigma) | mean abs err (sigma) | max (sigma) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for block in blocks:
        by = {(r["rtol"], r["time_variable"]): r for r in block["rows"]}
        for rtol in sorted({r["rtol"] for r in block["rows"]}, reverse=True):
            a, b = by.get((rtol, "t")), by.get((rtol, "sigma"))
            if a is None or b is None:
                continue
            out.append(
                f"| {block['target']} | {block['sde']} | {block['n']} | {block['dtype']} "
                f"| {rtol:g} | {a['nfe']} | {_fmt(a['mean_abs_err'], 4)} "
                f"| {_fmt(a['max_abs_err'], 3)} | {b['nfe']} | {_fmt(b['mean_abs_err'], 4)} "
                f"| {_fmt(b['max_abs_err'], 3)} |"
            )
    return out + [""]


def _song_md(blocks: list[dict]) -> list[str]:
    if not blocks:
        return []
    out = [
        "## Against Song et al.'s likelihood code (same model, same points)",
        "",
        "Song et al.'s code emulated (`scoresde.bench.likelihood.song_log_likelihood`): "
        "scipy RK45 at their default rtol = atol = 1e-5, one Rademacher probe, float32 model "
        "calls with numpy round trips; their `ode_func` calls the model twice per evaluation "
        "(drift, then drift and VJP for the divergence), the leaner variant once. Errors in "
        "nats against the reference; seconds: the fastest of the interleaved timed rounds (CPU "
        "time of the process, one thread); "
        'ratio: seconds / Song et al.\'s (2 calls) and / the 1-call variant. "as accurate": '
        "mean and max |error| both at most Song et al.'s.",
        "",
    ]
    for block in blocks:
        out += [
            f"### {block['target']} ({block['n']} points; {block['what']})",
            "",
            "| method | setting | dtype | score calls | mean abs err | max abs err "
            "| as accurate | seconds | time / Song | time / Song 1-call |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in block["rows"]:
            if "error" in r:
                out.append(f"| {r['method']} | {r['setting']} | fails: {r['error']} |" + " |" * 7)
                continue
            acc = {True: "yes", False: "no"}.get(r.get("as_accurate"), "")
            out.append(
                f"| {r['method']} | {r['setting']} | {r['dtype']} | {r['calls']} "
                f"| {_fmt(r['mean_abs_err'], 4)} | {_fmt(r['max_abs_err'], 3)} | {acc} "
                f"| {_fmt(r['seconds'], 3)} | {_fmt(r.get('ratio'), 2)} "
                f"| {_fmt(r.get('ratio_one_call'), 2)} |"
            )
        out.append("")
    return out


def markdown(results: dict) -> str:
    """The markdown report of a results dict (fixed layout)."""
    head = [
        f"# Benchmark: {results['suite']} ({results['mode']} mode)",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in results.get("versions", {}).items()),
        "",
    ]
    if "overhead" in results:
        body = _overhead_md(results)
    elif "likelihood" in results:
        body = (
            _likelihood_md(results)
            + _song_md(results.get("song", []))
            + _time_variables_md(results.get("time_variables", []))
        )
    else:
        body = _accuracy_md(results)
    return "\n".join(head + body)


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "overhead" in results:
        rows = [r for r in results["overhead"]["rows"] if "error" not in r]
        fig, ax = plt.subplots(figsize=(7, 0.35 * len(rows) + 1.5))
        ax.barh([r["method"] for r in rows], [r["ratio_to_bare"] for r in rows])
        ax.set_xscale("log")
        ax.set_xlabel("time per step / bare torch update")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return
    if "likelihood" in results:
        _plot_likelihood(results["likelihood"], path, plt)
        return
    blocks = results["targets"]
    names = _methods_in_order([r for b in blocks for r in b["rows"]])
    cmap = plt.get_cmap("tab20")
    # One colour per method in both panels; markers/line styles by family.
    style = {
        name: dict(color=cmap(i % 20), marker="os^Dv"[i // 20 % 5]) for i, name in enumerate(names)
    }
    fig, axes = plt.subplots(len(blocks), 2, figsize=(13, 5 * len(blocks)), squeeze=False)
    for (ax_err, ax_nll), block in zip(axes, blocks, strict=True):
        for name in _methods_in_order(block["rows"]):
            ok = [r for r in block["rows"] if r["method"] == name and r.get("finite")]
            ok.sort(key=lambda r: r["nfe"])
            stochastic = not any("ode_err" in r for r in ok)
            kw = dict(ms=3, label=name, ls="--" if stochastic else "-", **style[name])
            pts = [(r["nfe"], r["ode_err"]) for r in ok if r.get("ode_err", 0) > 0]
            if pts:
                ax_err.plot(*zip(*pts, strict=True), **kw)
            pts = [(r["nfe"], abs(r["nll"] - _true_nll(block))) for r in ok]
            if pts:
                ax_nll.plot(*zip(*pts, strict=True), **kw)
        ax_nll.axhline(2 * block["floor"]["nll_se"], color="k", ls=":", label="2 x NLL s.e.")
        for ax, title in ((ax_err, "ode_err"), (ax_nll, "|NLL - NLL(true samples)|")):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("NFE")
            ax.set_title(f"{block['target']}{_sde_label(block)}: {title}")
            ax.grid(True, which="both", alpha=0.3)
        ax_nll.legend(fontsize=6, loc="upper right", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_likelihood(blocks: list[dict], path: Path, plt: Any) -> None:
    fig, axes = plt.subplots(1, len(blocks), figsize=(6 * len(blocks), 4.5), squeeze=False)
    for ax, block in zip(axes[0], blocks, strict=True):
        for r in block["rows"]:
            if "error" in r or r["vs_p_eps"]["rms_err"] <= 0:
                continue
            err = r.get("vs_tight", r["vs_p_eps"])["rms_err"]
            if err > 0:
                ax.scatter(r["nfe"], err, label=f"{r['method']}, {r['setting']}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("NFE (score calls)")
        ax.set_ylabel("RMS error of log p_eps vs a tight solve (nats)")
        ax.set_title(block["target"])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results: dict, out_dir: Path, name: str) -> dict[str, Path]:
    """Write `<name>.json`, `<name>.md`, `<name>.png` into out_dir; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {ext: out_dir / f"{name}.{ext}" for ext in ("json", "md", "png")}
    paths["json"].write_text(json.dumps(results, indent=1, default=str) + "\n")
    paths["md"].write_text(markdown(results))
    _plot(results, paths["png"])
    return paths
