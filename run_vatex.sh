#!/usr/bin/env bash
# VATEX (DESIGN §8, §9): the MSR-VTT recipe of run.sh with margin_BD 0.05; every caption of
# a training video is a sample, and evaluation is multi-sentence (~10 captions per video).
# Every variable can be overridden from the environment; extra arguments go to
# main_task_retrieval.py, e.g.  bash run_vatex.sh --resume_model ckpts/vatex_avigate/training_state.pt
set -euo pipefail
cd "$(dirname "$0")"

NUM_GPUS=${NUM_GPUS:-4}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
NUM_WORKERS=${NUM_WORKERS:-8}
PRECISION=${PRECISION:-fp32}

DATA_PATH=${DATA_PATH:-data/vatex}                   # train_list.txt, test_list.txt, ref_captions.json
VIDEO_PATH=${VIDEO_PATH:-data/vatex/videos}
AUDIO_PATH=${AUDIO_PATH:-data/vatex/audio}
TRAIN_LIST=${TRAIN_LIST:-train_list.txt}
TEST_LIST=${TEST_LIST:-test_list.txt}
# Empty: the last epoch is tested. Held-out validation: python -m preprocess.make_val_split
# --datatype vatex --data_path $DATA_PATH, then TRAIN_LIST=train_list.minus_val500.txt VAL_LIST=val_list500.txt.
VAL_LIST=${VAL_LIST:-}

CLIP_NAME=${CLIP_NAME:-ViT-B/32}
AST_CHECKPOINT=${AST_CHECKPOINT:-modules/audioset_10_10_0.4593.pth}

TEXT_GUIDED=${TEXT_GUIDED:-}         # e.g. "--text_gate --text_query --query_gate"
GATE=${GATE:-soft}
FUSION_RESIDUAL=${FUSION_RESIDUAL:-0.05}
MARGIN_BD=${MARGIN_BD:-0.05}
BETA=${BETA:-0.2}

OUTPUT_DIR=${OUTPUT_DIR:-ckpts/vatex_avigate}

args=(
    --do_train --datatype vatex
    --data_path "$DATA_PATH" --features_path "$VIDEO_PATH" --audio_path "$AUDIO_PATH"
    --train_csv "$TRAIN_LIST" --test_csv "$TEST_LIST" --expand_msrvtt_sentences
    --output_dir "$OUTPUT_DIR"
    --pretrained_clip_name "$CLIP_NAME" --ast_checkpoint "$AST_CHECKPOINT"
    --epochs 5 --batch_size 128 --batch_size_val 16 --lr 1e-4 --coef_lr 1e-3
    --max_words 32 --max_frames 12 --feature_framerate 1 --slice_framepos 2
    --cross_num_hidden_layers 4 --audio_query_layers 4 --freeze_layer_num 0
    --margin_BD "$MARGIN_BD" --beta "$BETA" --gate "$GATE" --fusion_residual "$FUSION_RESIDUAL"
    --precision "$PRECISION" --num_thread_reader "$NUM_WORKERS" --save_every_steps 500
)
if [[ -n "$VAL_LIST" ]]; then args+=(--val_csv "$VAL_LIST"); fi
read -r -a text_guided <<< "$TEXT_GUIDED"

torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NUM_GPUS" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    main_task_retrieval.py "${args[@]}" ${text_guided[@]+"${text_guided[@]}"} "$@"
