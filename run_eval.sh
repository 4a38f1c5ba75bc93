#!/usr/bin/env bash
# Evaluate a model-only checkpoint (pytorch_model.bin.N of a training run) on a test split.
# The architecture switches must match the training run (see its args.json). Writes
# metrics.json, sim_matrix.npy, sim_rows.json, sim_cols.json, gates.json and log.txt.
#   CHECKPOINT=ckpts/msrvtt_avigate/pytorch_model.bin.4 bash run_eval.sh
#   CHECKPOINT=... TEXT_GUIDED="--text_gate --text_query --query_gate" bash run_eval.sh --dsl
# With NUM_GPUS > 1 texts and videos are encoded (and text rows scored) in shards.
set -euo pipefail
cd "$(dirname "$0")"

CHECKPOINT=${CHECKPOINT:?set CHECKPOINT to a pytorch_model.bin.N file}
NUM_GPUS=${NUM_GPUS:-1}
NUM_WORKERS=${NUM_WORKERS:-8}
PRECISION=${PRECISION:-bf16}         # as run.sh (README "Precision"); scores are fp32 either way

DATATYPE=${DATATYPE:-msrvtt}                         # msrvtt | vatex | charades
DATA_PATH=${DATA_PATH:-data/msrvtt}
VIDEO_PATH=${VIDEO_PATH:-data/msrvtt/videos}
AUDIO_PATH=${AUDIO_PATH:-data/msrvtt/audio}
TEST_CSV=${TEST_CSV:-}                               # empty: the datatype's test file
MAX_WORDS=${MAX_WORDS:-32}
MAX_FRAMES=${MAX_FRAMES:-12}

CLIP_NAME=${CLIP_NAME:-ViT-B/32}
AST_CHECKPOINT=${AST_CHECKPOINT:-modules/audioset_10_10_0.4593.pth}
TEXT_GUIDED=${TEXT_GUIDED:-}
GATE=${GATE:-soft}
FUSION_RESIDUAL=${FUSION_RESIDUAL:-0.05}
EVAL_PROTOCOL=${EVAL_PROTOCOL:-honest}               # paired_block = the LEAKING public protocol

OUTPUT_DIR=${OUTPUT_DIR:-$(dirname "$CHECKPOINT")/eval_$(basename "$CHECKPOINT")}

args=(
    --do_eval --datatype "$DATATYPE" --init_model "$CHECKPOINT"
    --data_path "$DATA_PATH" --features_path "$VIDEO_PATH" --audio_path "$AUDIO_PATH"
    --output_dir "$OUTPUT_DIR"
    --pretrained_clip_name "$CLIP_NAME" --ast_checkpoint "$AST_CHECKPOINT"
    --batch_size_val 16 --max_words "$MAX_WORDS" --max_frames "$MAX_FRAMES" --feature_framerate 1 --slice_framepos 2
    --cross_num_hidden_layers 4 --audio_query_layers 4 --gate "$GATE" --fusion_residual "$FUSION_RESIDUAL"
    --eval_protocol "$EVAL_PROTOCOL" --precision "$PRECISION" --num_thread_reader "$NUM_WORKERS"
)
if [[ -n "$TEST_CSV" ]]; then args+=(--test_csv "$TEST_CSV"); fi
read -r -a text_guided <<< "$TEXT_GUIDED"

torchrun --standalone --nproc_per_node "$NUM_GPUS" \
    main_task_retrieval.py "${args[@]}" ${text_guided[@]+"${text_guided[@]}"} "$@"
