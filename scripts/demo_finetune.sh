#!/usr/bin/env bash
# The demo behind `make demo-finetune`: BBC News topic classification with a small pretrained encoder, and
# headline generation with a small encoder-decoder, on data shipped in PyPI packages. Every step is a CLI
# call; everything lands in $OUT. Re-running resumes or skips what is done.
set -euo pipefail
CHOICELM=${CHOICELM:-.venv/bin/choicelm}
PY=${PY:-.venv/bin/python}
OUT=${OUT:-demo/finetune}
DATA=$OUT/data

[ -f "$DATA/bbc-classify/test.csv" ] || $PY scripts/finetune_data.py --out "$DATA" --overwrite
[ -f "$OUT/tokenizer/tokenizer.json" ] || $CHOICELM tokenizer train --input "$DATA/bbc-text" --vocab-size 8000 \
    --out "$OUT/tokenizer"
[ -f "$OUT/mlm-data/manifest.json" ] || $CHOICELM prepare --input "$DATA/bbc-text" --tokenizer "$OUT/tokenizer" \
    --out "$OUT/mlm-data" --val-fraction 0.05

echo "== 1. pretrain a small encoder by masked LM on the training articles"
$CHOICELM pretrain --config configs/bert-bbc.yaml --data "$OUT/mlm-data" --out "$OUT/bert-mlm" --resume auto

echo "== 2. fine-tune it to classify the 5 topics; metrics on the held-out test articles"
$CHOICELM finetune --task classify --from "$OUT/bert-mlm" --config configs/bert-bbc-classify.yaml \
    --train "$DATA/bbc-classify/train.csv" --val "$DATA/bbc-classify/val.csv" --out "$OUT/bbc-classify" --resume auto
$CHOICELM evaluate --checkpoint "$OUT/bbc-classify" --data "$DATA/bbc-classify/test.csv"

echo "== 3. train an encoder-decoder to write headlines; BLEU and ROUGE on the test articles"
$CHOICELM finetune --task seq2seq --config configs/seq2seq-bbc.yaml --tokenizer "$OUT/tokenizer" \
    --train "$DATA/bbc-headlines/train.jsonl" --val "$DATA/bbc-headlines/val.jsonl" --out "$OUT/headlines" --resume auto
$CHOICELM evaluate --checkpoint "$OUT/headlines" --data "$DATA/bbc-headlines/test.jsonl" --num-beams 4
