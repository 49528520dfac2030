"""Write the golden summary of a finished run: selected ids, each row's drop reason and score
columns. Used to record tests/golden/*.json (see tests/test_golden.py for which code wrote each):

    python tests/golden/extract.py RUN_DIR OUT.json
"""
import json
import math
import sys

import pyarrow.parquet as pq

SCORES = ("ifd_nll_cond", "ifd_nll_direct", "ifd_tokens", "ifd_tokens_direct", "ifd_loss", "ifd_ppl", "ifd_status",
          "rifd_nll_cond", "rifd_nll_direct", "rifd_loss", "rifd", "rifd_status")


def summary(run: str) -> dict:
    ann = pq.read_table(f"{run}/annotated").to_pylist()
    rows = {}
    for r in sorted(ann, key=lambda r: r["id"]):
        rows[r["id"]] = {"drop_reason": r["drop_reason"],
                         **{c: (None if isinstance(r[c], float) and math.isnan(r[c]) else r[c]) for c in SCORES}}
    selected = sorted(pq.read_table(f"{run}/selected").column("id").to_pylist())
    return {"selected": selected, "rows": rows}


if __name__ == "__main__":
    with open(sys.argv[2], "w", encoding="utf-8") as fh:
        json.dump(summary(sys.argv[1]), fh, indent=1, sort_keys=True)
        fh.write("\n")
