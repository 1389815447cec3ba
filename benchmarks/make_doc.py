"""Write docs/benchmarks.md from benchmarks/doc_template.md and the result files.

Run after the suites (see docs/benchmarks.md for their commands):
    python benchmarks/make_doc.py
Every `<!--INCLUDE suite:part-->` in the template is replaced by that part of
benchmarks/results/<suite>.md, so the page always quotes the latest results verbatim.
"""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
R = ROOT / "benchmarks" / "results"
tpl = (ROOT / "benchmarks" / "doc_template.md").read_text()


def section(md, start, stop_prefix):
    lines = md.splitlines()
    out, on = [], False
    for ln in lines:
        if ln.startswith(start):
            on = True
        elif on and any(ln.startswith(p) for p in stop_prefix):
            break
        if on:
            out.append(ln)
    return "\n".join(out).strip()


def demote(text):  # ### -> ####
    return re.sub(r"^(#+) ", lambda m: "#" + m.group(1) + " ", text, flags=re.M)


def inc(key):
    suite, part = key.split(":")
    md = (R / f"{suite}.md").read_text()
    if part == "summary":
        return demote(section(md, "### Best per NFE budget: deterministic", ["### ode_err"]))
    if part == "floor":
        return section(md, "True samples against", ["###"])
    if part == "odeerr":
        return demote(section(md, "### ode_err", ["### NLL"]))
    if part == "nll":
        return demote(section(md, "### NLL", ["### sliced"]))
    if part == "body":  # everything after the versions line, headings demoted twice
        body = md.split("\n", 4)[4]
        return demote(demote(body)).strip()
    if part == "blocksummaries":
        out = []
        for block in md.split("\n## ")[1:]:
            title = block.splitlines()[0]
            det = section(
                "### " + block.split("### ", 1)[1],
                "### Best per NFE budget: deterministic",
                ["### Best per NFE budget: stochastic"],
            )
            sto = section(block, "### Best per NFE budget: stochastic", ["### ode_err"])
            out.append(
                f"#### {title}\n\n"
                + demote(demote(det)).replace("##### ", "**", 1).split("\n", 1)[0]
                + "**\n"
                + det.split("\n", 1)[1]
                + "\n\n"
                + "**"
                + sto.split("\n", 1)[0][4:]
                + "**\n"
                + sto.split("\n", 1)[1]
            )
        return "\n\n".join(out)
    raise KeyError(key)


def repl(m):
    key = m.group(1)
    if key in (
        "schedules",
        "conditional",
        "stochastic_few_step",
        "bespoke_few_step",
        "switching",
        "fit_batch",
        "acceptance",
        "ems_v3",
        "ems_keep",
        "adaptive_path",
        "pc_corrector",
    ):
        lines = (R / f"{key}.md").read_text().splitlines()[1:]  # the page has its title
        body = "\n".join(ln for ln in lines if not ln.startswith("Command:"))
        return demote(demote(body)).strip()
    if key in ("few_step", "few_step_variants"):
        lines = (R / f"{key}.md").read_text().splitlines()[1:]  # the page has its title
        body = "\n".join(ln for ln in lines if not ln.startswith("Command:"))
        return demote(body).strip()
    if key == "trained":
        p = R / "trained.md"
        if p.is_file():
            return demote(p.read_text().strip())
        return (
            "*Not filled in yet: another helper writes `benchmarks/results/trained.md` "
            "(trained score networks, not exact scores); its content goes here.*"
        )
    return inc(key)


out = re.sub(r"<!--INCLUDE (\S+)-->", repl, tpl)
(ROOT / "docs" / "benchmarks.md").write_text(out)
print("written", len(out))
