"""Markdown table (method x depth, correct/trials) from a passkey.csv written by `lacache eval passkey`.

    python scripts/passkey_table.py passkey.csv [heatmap.png "title"]
"""

import csv
import sys
from collections import defaultdict


def main(path: str) -> None:
    cells: dict[tuple[str, float], list[bool]] = defaultdict(list)
    with open(path) as fh:
        for row in csv.DictReader(fh):
            cells[(row["method"], float(row["depth"]))].append(row["correct"] == "True")
    methods = list(dict.fromkeys(m for m, _ in cells))
    depths = sorted({d for _, d in cells})
    print("| method | " + " | ".join(f"depth {int(d * 100)}%" for d in depths) + " | all |")
    print("|---" * (len(depths) + 2) + "|")
    for m in methods:
        parts = [cells[(m, d)] for d in depths]
        total = sum(sum(p) for p in parts), sum(len(p) for p in parts)
        print(f"| {m} | " + " | ".join(f"{sum(p)}/{len(p)}" for p in parts) + f" | {total[0]}/{total[1]} |")


def plot(path: str, out: str, title: str) -> None:
    from lacache.lab.evaluation.passkey import PasskeyTrial, plot_heatmaps

    with open(path) as fh:
        trials = [PasskeyTrial(r["method"], int(r["length"]), float(r["depth"]), int(r["seed"]),
                               int(r["budget"]) if r["budget"] else None, r["key"], r["answer"],
                               r["correct"] == "True", float(r["seconds"])) for r in csv.DictReader(fh)]
    plot_heatmaps(trials, out, title)


if __name__ == "__main__":
    main(sys.argv[1])
    if len(sys.argv) > 2:
        plot(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "Pass key")
