#!/usr/bin/env bash
# The human-in-the-loop walkthrough of docs/studio.md, end to end on one machine (CPU, tiny model):
#   sft -> collect -> label in the browser (two annotators) -> agreement -> export -> rm -> ppo -> view
# scripts/human_loop_label.py stands in for the two people (alice through the API, bob in Chromium);
# to label by hand, open the printed links instead and press Enter here when both are done.
#
#   scripts/human_loop_demo.sh [OUT_DIR]            (default runs/human_loop)
#   HUMAN=1 scripts/human_loop_demo.sh              label by hand
#   RLHF_RAY="python -m rlhf_ray.cli" scripts/...   without the installed entry point
# Screenshots go to $SHOTS (default OUT_DIR/screenshots).
set -euo pipefail
OUT=${1:-runs/human_loop}
RLHF_RAY=${RLHF_RAY:-rlhf-ray}
PYTHON=${PYTHON:-python}
SHOTS=${SHOTS:-$OUT/screenshots}
mkdir -p "$OUT" "$SHOTS"
rm -rf "$OUT"/{sft,collect,rm,ppo} "$OUT"/labels.db*  # a fresh walkthrough each time
# The tiny Llama on small-number addition, every role on CPU in one local Ray per command.
TINY=(model.tiny_hidden_size=64 data.task=arithmetic rollout.num_engines=1 rollout.max_new_tokens=4
      rollout.max_model_len=64 rollout.gpu_memory_utilization=0.05 policy.num_ranks=1 critic.num_ranks=1)
step() { printf '\n== %s (%s)\n' "$1" "$(date +%T)"; }
SECONDS=0

step "1. sft: a policy that answers with numbers"
$RLHF_RAY sft "${TINY[@]}" run_dir="$OUT/sft" data.num_sft_examples=640 sft.epochs=3 sft.lr=3e-3

step "2. collect: 4 answers to each of 160 prompts, for people to judge (collect.judge=none)"
$RLHF_RAY collect "${TINY[@]}" run_dir="$OUT/collect" model.policy="$OUT/sft/model" collect.judge=none \
    collect.num_prompts=160 collect.responses_per_prompt=4

step "3. label: two annotators, every item shown to both (--overlap 1)"
$RLHF_RAY annotate serve --pairs "$OUT/collect/responses.jsonl" --db "$OUT/labels.db" --annotators alice,bob \
    --overlap 1 --overlap-k 2 --guidelines docs/studio_guidelines.md --port 0 > "$OUT/serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
if [[ -n "${HUMAN:-}" ]]; then
    sleep 3; cat "$OUT/serve.log"; read -rp "label with both links, then press Enter "
else
    $PYTHON scripts/human_loop_label.py label "$OUT/serve.log" --shots "$SHOTS"
fi
kill $SERVER; wait $SERVER 2>/dev/null || true
cat "$OUT/serve.log"

step "4. agreement"
$RLHF_RAY annotate stats --db "$OUT/labels.db"
$RLHF_RAY annotate stats --db "$OUT/labels.db" --json > "$OUT/stats.json"

step "5. export: pairs both annotators agree on (ties and both-bad left out)"
$RLHF_RAY annotate export --db "$OUT/labels.db" --out "$OUT/human_prefs.jsonl" --min-agreement 1

step "6. rm: a reward model on the export"
$RLHF_RAY rm "${TINY[@]}" run_dir="$OUT/rm" model.policy="$OUT/sft/model" data.preferences="$OUT/human_prefs.jsonl" \
    data.eval_fraction=0.2 rm.epochs=5 rm.lr=1e-3 rm.batch_size=16

step "7. ppo: the policy against the human-trained reward model (the task's gold score is only logged)"
$RLHF_RAY ppo "${TINY[@]}" run_dir="$OUT/ppo" model.policy="$OUT/sft/model" model.reward="[$OUT/rm/reward_model-0]" \
    data.num_prompts=16 ppo.advantage_estimator=grpo rollout.samples_per_prompt=4 ppo.prompts_per_iteration=16 \
    ppo.iterations=3 policy.micro_batch_size=16 logging.samples_per_iteration=64 checkpoint.save_final=false

step "8. view: the policy's samples; chosen ones can go back to the annotation set"
$RLHF_RAY view "$OUT/ppo" --db "$OUT/labels.db" --port 0 > "$OUT/view.log" 2>&1 &
VIEWER=$!
trap 'kill $VIEWER 2>/dev/null || true' EXIT
$PYTHON scripts/human_loop_label.py view "$OUT/view.log" --out "$SHOTS/human_loop_view.png"
if [[ -n "${HUMAN:-}" ]]; then cat "$OUT/view.log"; read -rp "press Enter to stop the viewer "; fi
kill $VIEWER; wait $VIEWER 2>/dev/null || true

printf '\nhuman loop done in %d s: %s\n' "$SECONDS" "$OUT"
