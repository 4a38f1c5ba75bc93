#!/usr/bin/env bash
# The released AVIGATE recipe (DESIGN §7) under torchrun: 5 epochs, global batch 128, lr 1e-4,
# coef_lr 1e-3, max_words 32, max_frames 12, beta 0.2, margin_BD 0.1 (VATEX 0.05).
# DATATYPE picks the dataset (msrvtt | vatex | charades; run_vatex.sh / run_charades.sh set it).
# Every variable below can be overridden from the environment, e.g.
#   NUM_GPUS=8 TEXT_GUIDED="--text_gate --text_query --query_gate" OUTPUT_DIR=ckpts/tg bash run.sh
#   PRECISION=fp32 bash run.sh      # the released fp32 recipe (bf16 autocast is the default)
# Extra arguments are passed on to main_task_retrieval.py (they win over the ones here):
#   bash run.sh --resume_model ckpts/msrvtt_avigate/training_state.pt
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT on every node.
set -euo pipefail
cd "$(dirname "$0")"

# ---- dataset (DESIGN §9): annotation files and margin cap per dataset
DATATYPE=${DATATYPE:-msrvtt}
case "$DATATYPE" in
    msrvtt)   train_file=MSRVTT_train.9k.csv; test_file=MSRVTT_JSFUSION_test.csv; margin=0.1
              every_caption=--expand_msrvtt_sentences ;;
    vatex)    train_file=train_list.txt; test_file=test_list.txt; margin=0.05
              every_caption=--expand_msrvtt_sentences ;;     # multi-sentence evaluation
    charades) train_file=charades_train.csv; test_file=charades_test.csv; margin=0.1
              every_caption= ;;                             # one caption per video
    *) echo "run.sh: DATATYPE must be msrvtt, vatex or charades (got '$DATATYPE')" >&2; exit 2 ;;
esac

# ---- machines
NUM_GPUS=${NUM_GPUS:-4}              # processes (GPUs) per node
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
NUM_WORKERS=${NUM_WORKERS:-8}        # DataLoader workers per process
PRECISION=${PRECISION:-bf16}         # bf16 (README "Precision"; Ampere or newer) | fp32 (released) | fp16

# ---- data (DESIGN §9); videos may be compressed first (preprocess/compress_video.py)
DATA_PATH=${DATA_PATH:-data/$DATATYPE}                # annotation files
VIDEO_PATH=${VIDEO_PATH:-data/$DATATYPE/videos}       # <video_id>.mp4
AUDIO_PATH=${AUDIO_PATH:-data/$DATATYPE/audio}        # <video_id>.wav (preprocess/extract_audio.py)
TRAIN_CSV=${TRAIN_CSV:-$train_file}
TEST_CSV=${TEST_CSV:-$test_file}                      # MSR-VTT: 1k-A
# Model selection. Empty: the last epoch is tested. A held-out slice of the training videos
# (python -m preprocess.make_val_split --datatype $DATATYPE --data_path $DATA_PATH) gives
# e.g. for MSR-VTT TRAIN_CSV=MSRVTT_train.9k.minus_val500.csv VAL_CSV=MSRVTT_JSFUSION_val500.csv.
# VAL_CSV=MSRVTT_JSFUSION_test.csv reproduces the published recipes (selection on the test set).
VAL_CSV=${VAL_CSV:-}

# ---- weights
CLIP_NAME=${CLIP_NAME:-ViT-B/32}                     # modules/ViT-B-32.pt, or a path
AST_CHECKPOINT=${AST_CHECKPOINT:-modules/audioset_10_10_0.4593.pth}

# ---- method
TEXT_GUIDED=${TEXT_GUIDED:-}         # "" = AVIGATE; e.g. "--text_gate --text_query --query_gate"
GATE=${GATE:-soft}                   # soft | hard | none
FUSION_RESIDUAL=${FUSION_RESIDUAL:-0.05}
MARGIN_BD=${MARGIN_BD:-$margin}
BETA=${BETA:-0.2}

OUTPUT_DIR=${OUTPUT_DIR:-ckpts/${DATATYPE}_avigate}

args=(
    --do_train --datatype "$DATATYPE"
    --data_path "$DATA_PATH" --features_path "$VIDEO_PATH" --audio_path "$AUDIO_PATH"
    --train_csv "$TRAIN_CSV" --test_csv "$TEST_CSV"
    --output_dir "$OUTPUT_DIR"
    --pretrained_clip_name "$CLIP_NAME" --ast_checkpoint "$AST_CHECKPOINT"
    --epochs 5 --batch_size 128 --batch_size_val 16 --lr 1e-4 --coef_lr 1e-3
    --max_words 32 --max_frames 12 --feature_framerate 1 --slice_framepos 2
    --cross_num_hidden_layers 4 --audio_query_layers 4 --freeze_layer_num 0
    --margin_BD "$MARGIN_BD" --beta "$BETA" --gate "$GATE" --fusion_residual "$FUSION_RESIDUAL"
    --precision "$PRECISION" --num_thread_reader "$NUM_WORKERS" --save_every_steps 500
)
if [[ -n "$every_caption" ]]; then args+=("$every_caption"); fi
if [[ -n "$VAL_CSV" ]]; then args+=(--val_csv "$VAL_CSV"); fi
read -r -a text_guided <<< "$TEXT_GUIDED"

torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NUM_GPUS" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    main_task_retrieval.py "${args[@]}" ${text_guided[@]+"${text_guided[@]}"} "$@"
