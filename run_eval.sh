#!/usr/bin/env bash
# Evaluate a model-only checkpoint (pytorch_model.bin.N of a training run) on a test split.
# Writes metrics.json, sim_matrix.npy, sim_rows.json, sim_cols.json, gates.json and log.txt.
#   CHECKPOINT=ckpts/msrvtt_avigate/pytorch_model.bin.4 bash run_eval.sh
#   CHECKPOINT=ckpts/msrvtt_avigate/pytorch_model.bin.4 bash run_eval.sh --dsl
# The architecture (fusion depth, gates, residual, text flags, frames, CLIP/AST sizes) comes from
# the checkpoint's record (pytorch_model.bin.N.json, written by training): no architecture flag
# is needed. A flag given anyway (the variables below, or extra arguments) must agree with the
# record, else the run stops naming both values. A checkpoint without a record (older runs, the
# released code's files) needs the flags of its training run: set them here, e.g.
#   CHECKPOINT=old/pytorch_model.bin.4 GATE=soft FUSION_RESIDUAL=0.05 MAX_FRAMES=12 \
#       TEXT_GUIDED="--text_gate --text_query --query_gate" bash run_eval.sh
#   CHECKPOINT=... AUDIO_PERTURB=noise bash run_eval.sh --audio_noise_rms 0.1 --dump_topk 10
#   CHECKPOINT=ckpts/msrvtt_tg-two-stage/pytorch_model.bin.0 RERANK_TOPK=50 bash run_eval.sh
# Extra arguments go to main_task_retrieval.py last (they override the settings above).
# The same flags audit a checkpoint: python -m tools.audit_protocol --audit_dir DIR -- <flags>.
# With NUM_GPUS > 1 texts and videos are encoded (and text rows scored) in shards.
set -euo pipefail
cd "$(dirname "$0")"

CHECKPOINT=${CHECKPOINT:?set CHECKPOINT to a pytorch_model.bin.N file}
NUM_GPUS=${NUM_GPUS:-1}
NUM_WORKERS=${NUM_WORKERS:-8}
PRECISION=${PRECISION:-bf16}         # as run.sh (README "Precision"); scores are fp32 either way

DATATYPE=${DATATYPE:-msrvtt}                         # msrvtt | vatex | charades
DATA_PATH=${DATA_PATH:-data/$DATATYPE}
VIDEO_PATH=${VIDEO_PATH:-data/$DATATYPE/videos}
AUDIO_PATH=${AUDIO_PATH:-data/$DATATYPE/audio}
TEST_CSV=${TEST_CSV:-}                               # empty: the datatype's test file
MAX_WORDS=${MAX_WORDS:-32}
EVAL_PROTOCOL=${EVAL_PROTOCOL:-honest}               # paired_block = the LEAKING public protocol
AUDIO_PERTURB=${AUDIO_PERTURB:-none}                 # none | silence | noise | swap (robustness)
RERANK_TOPK=${RERANK_TOPK:-0}                        # text-guided: fuse only each text's/video's top K (0: every pair)

# Architecture and weight flags: empty = from the checkpoint's record.
CLIP_NAME=${CLIP_NAME:-}
AST_CHECKPOINT=${AST_CHECKPOINT:-}
TEXT_GUIDED=${TEXT_GUIDED:-}
GATE=${GATE:-}
FUSION_RESIDUAL=${FUSION_RESIDUAL:-}
MAX_FRAMES=${MAX_FRAMES:-}

OUTPUT_DIR=${OUTPUT_DIR:-$(dirname "$CHECKPOINT")/eval_$(basename "$CHECKPOINT")}

args=(
    --do_eval --datatype "$DATATYPE" --init_model "$CHECKPOINT"
    --data_path "$DATA_PATH" --features_path "$VIDEO_PATH" --audio_path "$AUDIO_PATH"
    --output_dir "$OUTPUT_DIR"
    --batch_size_val 16 --max_words "$MAX_WORDS" --feature_framerate 1 --slice_framepos 2
    --eval_protocol "$EVAL_PROTOCOL" --audio_perturb "$AUDIO_PERTURB" --precision "$PRECISION" --num_thread_reader "$NUM_WORKERS"
)
if [[ -n "$TEST_CSV" ]]; then args+=(--test_csv "$TEST_CSV"); fi
if [[ "$RERANK_TOPK" != 0 ]]; then args+=(--rerank_topk "$RERANK_TOPK"); fi
if [[ -n "$CLIP_NAME" ]]; then args+=(--pretrained_clip_name "$CLIP_NAME"); fi
if [[ -n "$AST_CHECKPOINT" ]]; then args+=(--ast_checkpoint "$AST_CHECKPOINT"); fi
if [[ -n "$GATE" ]]; then args+=(--gate "$GATE"); fi
if [[ -n "$FUSION_RESIDUAL" ]]; then args+=(--fusion_residual "$FUSION_RESIDUAL"); fi
if [[ -n "$MAX_FRAMES" ]]; then args+=(--max_frames "$MAX_FRAMES"); fi
read -r -a text_guided <<< "$TEXT_GUIDED"

torchrun --standalone --nproc_per_node "$NUM_GPUS" \
    main_task_retrieval.py "${args[@]}" ${text_guided[@]+"${text_guided[@]}"} "$@"
