#!/usr/bin/env bash
# Charades (docs/design.md §9): run.sh's recipe with the paper's Charades settings (Table 7: batch 64,
# 32 frames, 64 words, margin_BD 0.1) on train/test CSVs with columns
# video_id, sentence (one caption per video). Files under DATA_PATH (default data/charades):
# charades_train.csv, charades_test.csv.
# Variables and extra arguments as in run.sh, e.g. bash run_charades.sh --resume_model ckpts/charades_avigate/training_state.pt
exec env DATATYPE=charades bash "$(dirname "$0")/run.sh" "$@"
