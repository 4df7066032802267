"""Markdown table (method x depth, correct/trials) from a passkey.csv written by `lacache eval passkey`."""

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


if __name__ == "__main__":
    main(sys.argv[1])
