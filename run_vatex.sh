#!/usr/bin/env bash
# VATEX (docs/design.md §8, §9): run.sh's recipe with the paper's margin_BD 0.05 (Table 7); every caption of a training video
# is a sample, and evaluation is multi-sentence (~10 captions per video). Files under
# DATA_PATH (default data/vatex): train_list.txt, test_list.txt, ref_captions.json.
# Variables and extra arguments as in run.sh, e.g. bash run_vatex.sh --resume_model ckpts/vatex_avigate/training_state.pt
exec env DATATYPE=vatex bash "$(dirname "$0")/run.sh" "$@"
