#!/usr/bin/env bash
# The AMiD paper's GPT-2 setting, end to end (GPU + Hugging Face Hub access needed):
#   teacher  GPT-2 XL (1.5B) fine-tuned on databricks-dolly-15k (SFT),
#   students GPT-2 small (124M) / medium (355M) / large (774M),
#   training data the 11.4k-example Dolly split used by MiniLLM / DistiLLM / AMiD,
#   evaluation ROUGE-L (5 sampling seeds, mean) on Dolly, SelfInst, Vicuna, S-NI and UnNI.
#
# Usage:  TEACHER=path-or-hub-name-of-your-gpt2-xl-sft DATA=dir-with-dolly_train.jsonl-and-test-sets \
#         STUDENT=gpt2 bash pipelines/paper_gpt2_dolly.sh
# The data directory holds dolly_train.jsonl (prompt/response), dolly_test.jsonl,
# self-inst_test.jsonl, vicuna_test.jsonl, sinst_test.jsonl, uinst_test.jsonl (the MiniLLM
# evaluation files). Everything lands in ${OUT:-paper_out}/; rerunning resumes.
set -euo pipefail
: "${TEACHER:?set TEACHER to the GPT-2 XL SFT teacher (hub name or directory)}"
: "${DATA:?set DATA to the directory with dolly_train.jsonl and the five test sets}"
STUDENT=${STUDENT:-gpt2}
OUT=${OUT:-paper_out}
# Training settings of the authors' public scripts (github.com/aailab-kaist/AMiD, scripts/gpt2):
# 10 epochs, effective batch 32, lr 5e-4 with cosine decay, max length 512, λ 0.5 in their
# example script. They also train on student-generated responses (DistiLLM's adaptive
# off-policy generation) and mix in an OpenWebText LM loss; a teacher cache scores only the
# dataset's responses, so this recipe is the fixed-data variant of their setting.
EPOCHS=${EPOCHS:-10}
LAMS=${LAMS:-0.1,0.5}
AMID=${AMID:-amid}
# Optional: plain text (e.g. an OpenWebText sample, one {"text": ...} per line) for the LM loss.
LM_ARGS=()
if [ -n "${LM_DATA:-}" ]; then
  LM_ARGS=(--train-arg lm_data="$LM_DATA" --train-arg lm_length=512 --train-arg lm_batch_size=8)
fi

# Stage one, once: the teacher's top-64 on every response token of the training split.
$AMID cache-teacher --teacher "$TEACHER" --data "$DATA/dolly_train.jsonl" --out "$OUT/cache" \
    --top-k 64 --max-length 512 --overflow truncate --dtype bf16

# Stage two: the baselines and AMiD at several α from the same cache.
$AMID sweep --cache "$OUT/cache" --student "$STUDENT" --out "$OUT/sweep" \
    --preset kd,rkl,skl,srkl,gkd,taid,abkd,amid --alpha -3,-1,0,0.5,1 --lam "$LAMS" \
    --train-arg epochs="$EPOCHS" --train-arg batch_size=8 --train-arg grad_accum=4 \
    --train-arg lr=5e-4 --train-arg eval_every=500 --train-arg save_every=500 ${LM_ARGS[@]+"${LM_ARGS[@]}"}

# Evaluation: ROUGE-L on the five sets, 5 seeds each, for every finished run.
shopt -s nullglob
for run in "$OUT"/sweep/runs/*/; do
  [ -d "$run/final" ] || continue   # a failed run (see the sweep's results table)
  for set in dolly_test self-inst_test vicuna_test sinst_test uinst_test; do
    [ -f "$run/eval_$set/eval.json" ] && continue
    $AMID eval --model "$run" --data "$DATA/$set.jsonl" --rouge --seeds 10,20,30,40,50 \
        --max-new-tokens 512 --max-length 512 --out "$run/eval_$set"
  done
done
echo "ROUGE-L per run and set: $OUT/sweep/runs/*/eval_*/eval.json; the table:"
${PYTHON:-python} -m pipelines.paper_table "$OUT"
