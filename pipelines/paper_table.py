"""The paper recipe's ROUGE-L table, from the eval.json files it leaves behind.

    python -m pipelines.paper_table [paper_out]

`pipelines/paper_gpt2_dolly.sh` writes OUT/sweep/runs/RUN/eval_SET/eval.json for each finished
run and evaluation set. This prints one Markdown row per run: ROUGE-L on Dolly, SelfInst,
Vicuna, S-NI and UnNI as "mean (std over sampling seeds)", and their average — the layout of
the paper's main table, so the two can be read side by side. Missing cells are "·".
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

# (file stem used by the recipe, column title)
SETS = [("dolly_test", "Dolly"), ("self-inst_test", "SelfInst"), ("vicuna_test", "Vicuna"),
        ("sinst_test", "S-NI"), ("uinst_test", "UnNI")]


def collect(out: Path) -> dict[str, dict[str, list[float]]]:
    """{run: {set stem: ROUGE-L per seed}} for every eval.json under OUT/sweep/runs."""
    table: dict[str, dict[str, list[float]]] = {}
    for run in sorted(p for p in (out / "sweep" / "runs").glob("*") if p.is_dir()):
        for stem, _ in SETS:
            f = run / f"eval_{stem}" / "eval.json"
            if f.exists():
                result = json.loads(f.read_text())
                table.setdefault(run.name, {})[stem] = list(result.get("rougeL_per_seed") or [result["rougeL"]])
    return table


def markdown(table: dict[str, dict[str, list[float]]]) -> str:
    lines = ["| run | " + " | ".join(title for _, title in SETS) + " | average |",
             "|---|" + "---:|" * (len(SETS) + 1)]
    for run, sets in table.items():
        cells, means = [], []
        for stem, _ in SETS:
            scores = sets.get(stem)
            if not scores:
                cells.append("·")
                continue
            mean = statistics.fmean(scores)
            means.append(mean)
            spread = f" ({statistics.stdev(scores):.2f})" if len(scores) > 1 else ""
            cells.append(f"{mean:.2f}{spread}")
        average = f"{statistics.fmean(means):.2f}" if len(means) == len(SETS) else "·"
        lines.append(f"| {run} | " + " | ".join(cells) + f" | {average} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?", default="paper_out", help="the recipe's OUT directory")
    args = ap.parse_args(argv)
    table = collect(Path(args.out))
    if not table:
        print(f"{args.out}: no eval.json under sweep/runs/*/eval_*/ yet; run pipelines/paper_gpt2_dolly.sh first")
        return 1
    print(markdown(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
