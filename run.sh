#!/usr/bin/env bash
# The released AVIGATE recipe (docs/design.md §7) under torchrun: 5 epochs, global batch 128, lr 1e-4,
# coef_lr 1e-3, max_words 32, max_frames 12, beta 0.2, margin_BD 0.1 (VATEX 0.05; Charades batch 64,
# max_frames 32, max_words 64).
# DATATYPE picks the dataset (msrvtt | vatex | charades; run_vatex.sh / run_charades.sh set it).
# Every variable below can be overridden from the environment, e.g.
#   NUM_GPUS=8 TEXT_GUIDED="--text_gate --text_query --query_gate" OUTPUT_DIR=ckpts/tg bash run.sh
#   PRECISION=fp32 bash run.sh      # the released fp32 recipe (bf16 autocast is the default)
# Extra arguments are passed on to main_task_retrieval.py (they win over the ones here):
#   bash run.sh --resume_model ckpts/msrvtt_avigate/training_state.pt
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT on every node.
#
# Presets: one row of the AVIGATE paper's ablations, or a text-guided variant, per name:
#   bash run.sh --list-presets                   # every preset, one line each
#   PRESET=table4-gated bash run.sh              # output in ckpts/<datatype>_<preset>
#   STAGE1_CHECKPOINT=ckpts/msrvtt_avigate/pytorch_model.bin.4 PRESET=tg-two-stage bash run.sh
#   PRESET=table11a-depth2 bash run.sh --dry-run # print the command instead of running it
# The table4/5/11 presets reproduce paper rows with the released recipe in full: fp32, global
# gradient clipping, the released weight-decay rule and padding rule (docs/fidelity.md, "Fidelity to the
# released code"); the text-guided ones keep the defaults of plain `bash run.sh` (AVIGATE), so the
# two compare directly. docs/presets.md puts the paper's numbers beside each row.
#
# Before any rank starts, run.sh looks for GPUs (nvidia-smi, CUDA_VISIBLE_DEVICES): with none and
# NUM_GPUS unset it trains as ONE CPU process (said so); NUM_GPUS above the GPUs found is refused.
# Then `main_task_retrieval.py --check_only` checks the flags, the data files and the weights
# (fetched into the weights cache once) and prints one error if any is wrong.
#
# Variables (default in brackets; docs/first_hour.md walks through a first run):
#   DATATYPE [msrvtt]      msrvtt | vatex | charades
#   DATA_PATH [data/$DATATYPE]  annotation files;  TRAIN_CSV, TEST_CSV [the datatype's]; VAL_CSV [none]
#   VIDEO_PATH [data/$DATATYPE/videos]  <video_id>.mp4;  AUDIO_PATH [data/$DATATYPE/audio]  <video_id>.wav
#   NUM_GPUS [4, or the GPUs found when fewer]  processes per node;  NUM_WORKERS [8] loader workers
#   NNODES [1], NODE_RANK [0], MASTER_ADDR [127.0.0.1], MASTER_PORT [29500]   multi-node
#   PRECISION [bf16]       training autocast: bf16 | fp32 (released) | fp16
#   EVAL_PRECISION [fp32]  precision of the validation/test evaluation (fp32 reproduces published numbers)
#   CLIP_NAME [ViT-B/32], AST_CHECKPOINT [modules/audioset_10_10_0.4593.pth]   weights (resolved through
#                          the weights cache, modules/weights.py)
#   TEXT_GUIDED [""], GATE [soft], FUSION_RESIDUAL [0.05], MARGIN_BD [0.1; VATEX 0.05], BETA [0.2]
#   PRESET [""], STAGE1_CHECKPOINT    see --list-presets
#   OUTPUT_DIR [ckpts/<datatype>_<preset or avigate>]
# Options: --help, --list-presets, --dry-run (print the command), then main_task_retrieval.py flags.
set -euo pipefail
cd "$(dirname "$0")"

if [[ ${1:-} == --help || ${1:-} == -h ]]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    echo "Flags of main_task_retrieval.py: python main_task_retrieval.py --help"
    exit 0
fi

PAPER_ROW=(--precision fp32 --grad_clip_scope global --weight_decay_rule released --padding_rule released)
TEXT_ALL=(--text_gate --text_query --query_gate)
# The listed sweeps of Table 11 (a)-(c): the paper's values (1 2 4 6; 0 0.1 0.2 0.3; 0 0.05 0.1 0.15 0.2)
# and ours around them; any other value works too (e.g. table11b-beta0.25).
DEPTHS=(1 2 3 4 5 6)
BETAS=(0 0.1 0.2 0.3 0.4 0.5)
DELTAS=(0 0.05 0.1 0.15 0.2)
FIXED_PRESETS=(table1-avigate table4-clip table4-fusion table4-fusion-margin table4-gated table4-gated-fixed table4-margin
               table5-global table5-local table5-both)
AFTER_SWEEPS=(table11d-hard table11e-frozen-ast table11e-train-ast table11f-freeze-clip
              tg-gate tg-query tg-qgate tg-all tg-two-stage)

preset_names() {
    local n
    printf '%s\n' "${FIXED_PRESETS[@]}"
    for n in "${DEPTHS[@]}"; do echo "table11a-depth$n"; done
    for n in "${BETAS[@]}"; do echo "table11b-beta$n"; done
    for n in "${DELTAS[@]}"; do echo "table11c-delta$n"; done
    printf '%s\n' "${AFTER_SWEEPS[@]}"
}

number_suffix() {  # the number after a sweep preset's prefix, or an error
    local value=${1#"$2"}
    if [[ ! $value =~ ^[0-9]+([.][0-9]+)?$ ]]; then
        echo "run.sh: preset '$1' needs a number after '$2' (e.g. ${2}${3})" >&2
        exit 2
    fi
    echo "$value"
}

# preset NAME: sets preset_help, preset_args (flags added to the recipe) and preset_from_checkpoint
# (1: the architecture comes from the checkpoint's record, so the recipe's architecture flags
# are left out).
preset() {
    preset_from_checkpoint=0
    local value
    case "$1" in
        table1-avigate) preset_help="Tables 1-3: AVIGATE with the released recipe in full, on DATATYPE's settings"
                        preset_args=("${PAPER_ROW[@]}") ;;
        table4-clip)    preset_help="Table 4: CLIP baseline (visual only, no audio, plain contrastive loss)"
                        preset_args=(--no_audio --beta 0 "${PAPER_ROW[@]}") ;;
        table4-fusion)  preset_help="Table 4: + audio fusion without gates (gates fixed at 1), plain loss"
                        preset_args=(--gate none --beta 0 "${PAPER_ROW[@]}") ;;
        table4-fusion-margin) preset_help="Table 4: audio fusion without gates + adaptive margin"
                        preset_args=(--gate none "${PAPER_ROW[@]}") ;;
        table4-gated)   preset_help="Table 4: + gated fusion (soft gates), plain loss"
                        preset_args=(--gate soft --beta 0 "${PAPER_ROW[@]}") ;;
        table4-gated-fixed) preset_help="Table 4: gated fusion + fixed margin (every negative's margin = delta = 0.1)"
                        preset_args=(--gate soft --margin_fixed --margin_BD 0.1 "${PAPER_ROW[@]}") ;;
        table4-margin)  preset_help="Table 4: + adaptive margin = AVIGATE (beta 0.2)"
                        preset_args=(--gate soft "${PAPER_ROW[@]}") ;;
        table5-global)  preset_help="Table 5: global alignment only"
                        preset_args=(--alignment global "${PAPER_ROW[@]}") ;;
        table5-local)   preset_help="Table 5: local (log-sum-exp over frames) alignment only"
                        preset_args=(--alignment local "${PAPER_ROW[@]}") ;;
        table5-both)    preset_help="Table 5: global + local alignment (= AVIGATE)"
                        preset_args=(--alignment both "${PAPER_ROW[@]}") ;;
        table11a-depth*) value=$(number_suffix "$1" table11a-depth 2)
                        preset_help="Table 11 (a): fusion depth, $value gated fusion block(s)"
                        preset_args=(--cross_num_hidden_layers "$value" "${PAPER_ROW[@]}") ;;
        table11b-beta*) value=$(number_suffix "$1" table11b-beta 0.3)
                        preset_help="Table 11 (b): adaptive-margin slope beta = $value"
                        preset_args=(--beta "$value" "${PAPER_ROW[@]}") ;;
        table11c-delta*) value=$(number_suffix "$1" table11c-delta 0.15)
                        preset_help="Table 11 (c): adaptive-margin cap delta (--margin_BD) = $value"
                        preset_args=(--margin_BD "$value" "${PAPER_ROW[@]}") ;;
        table11d-hard)  preset_help="Table 11 (d): hard gates (open/closed) instead of soft"
                        preset_args=(--gate hard "${PAPER_ROW[@]}") ;;
        table11e-frozen-ast) preset_help="Table 11 (e): AST trunk frozen (as always), global batch 32 like the fine-tuned row"
                        preset_args=(--batch_size 32 "${PAPER_ROW[@]}") ;;
        table11e-train-ast) preset_help="Table 11 (e): AST trunk fine-tuned (lr x coef_lr), global batch 32"
                        preset_args=(--train_ast --batch_size 32 "${PAPER_ROW[@]}") ;;
        table11f-freeze-clip) preset_help="Table 11 (f): both CLIP towers frozen"
                        preset_args=(--freeze_clip "${PAPER_ROW[@]}") ;;
        tg-gate)        preset_help="text-guided: text-conditioned gates only (residual start)"
                        preset_args=(--text_gate) ;;
        tg-query)       preset_help="text-guided: text injected into the cross-attention query only (residual start)"
                        preset_args=(--text_query) ;;
        tg-qgate)       preset_help="text-guided: gated text injection only (--query_gate implies the injection)"
                        preset_args=(--query_gate) ;;
        tg-all)         preset_help="text-guided: all three text flags, one stage (residual start)"
                        preset_args=("${TEXT_ALL[@]}") ;;
        tg-two-stage)   preset_help="text-guided stage 2: all three text flags on \$STAGE1_CHECKPOINT (AVIGATE, stage 1 = bash run.sh), --freeze_agnostic, 1 epoch"
                        if [[ -z ${STAGE1_CHECKPOINT:-} && ${LISTING:-0} != 1 ]]; then
                            echo "run.sh: PRESET=tg-two-stage fine-tunes a stage-1 AVIGATE checkpoint: set" \
                                 "STAGE1_CHECKPOINT to its model file, e.g." \
                                 "STAGE1_CHECKPOINT=ckpts/${DATATYPE}_avigate/pytorch_model.bin.4 (stage 1: bash run.sh)" >&2
                            exit 2
                        fi
                        if [[ ${LISTING:-0} != 1 && ! -f $STAGE1_CHECKPOINT ]]; then
                            echo "run.sh: STAGE1_CHECKPOINT=$STAGE1_CHECKPOINT is not a file (train stage 1 with: bash run.sh)" >&2
                            exit 2
                        fi
                        preset_args=(--init_model "${STAGE1_CHECKPOINT:-\$STAGE1_CHECKPOINT}" --freeze_agnostic
                                     "${TEXT_ALL[@]}" --epochs 1)
                        preset_from_checkpoint=1 ;;
        *) echo "run.sh: unknown PRESET '$1'; bash run.sh --list-presets lists them" >&2
           exit 2 ;;
    esac
}

if [[ ${1:-} == --list-presets ]]; then
    LISTING=1
    DATATYPE=${DATATYPE:-msrvtt}
    while read -r name; do
        preset "$name"
        printf '%-22s %s  [%s]\n' "$name" "$preset_help" "${preset_args[*]}"
    done < <(preset_names)
    exit 0
fi
DRY_RUN=0
if [[ ${1:-} == --dry-run ]]; then DRY_RUN=1; shift; fi

# ---- dataset (docs/design.md §9): annotation files and the paper's per-dataset settings (Table 7:
# margin cap; Charades: batch 64, 32 frames, 64 words)
DATATYPE=${DATATYPE:-msrvtt}
batch=128; frames=12; words=32
case "$DATATYPE" in
    msrvtt)   train_file=MSRVTT_train.9k.csv; test_file=MSRVTT_JSFUSION_test.csv; margin=0.1
              every_caption=--expand_msrvtt_sentences ;;
    vatex)    train_file=train_list.txt; test_file=test_list.txt; margin=0.05
              every_caption=--expand_msrvtt_sentences ;;     # multi-sentence evaluation
    charades) train_file=charades_train.csv; test_file=charades_test.csv; margin=0.1
              batch=64; frames=32; words=64
              every_caption= ;;                             # one caption per video
    *) echo "run.sh: DATATYPE must be msrvtt, vatex or charades (got '$DATATYPE')" >&2; exit 2 ;;
esac

PRESET=${PRESET:-}
preset_args=()
preset_from_checkpoint=0
if [[ -n $PRESET ]]; then preset "$PRESET"; fi

# ---- machines
# GPUs this node can use: nvidia-smi's list, narrowed by CUDA_VISIBLE_DEVICES when set.
gpus_found() {
    local count=0
    if command -v nvidia-smi > /dev/null 2>&1; then
        count=$(nvidia-smi -L 2> /dev/null | grep -c '^GPU ' || true)
    fi
    if [[ -n ${CUDA_VISIBLE_DEVICES+set} && $count -gt 0 ]]; then
        local visible
        visible=$(tr ',' '\n' <<< "$CUDA_VISIBLE_DEVICES" | grep -c '[^[:space:]]' || true)
        if ((visible < count)); then count=$visible; fi
    fi
    echo "$count"
}
GPUS_FOUND=$(gpus_found)
device_args=()
if [[ -z ${NUM_GPUS:-} ]]; then
    if ((GPUS_FOUND == 0)); then
        NUM_GPUS=1
        device_args=(--device cpu)
        echo "run.sh: no GPU found (nvidia-smi): training as ONE CPU process (--device cpu); this is slow." \
             "On a GPU machine set NUM_GPUS to the GPUs to use." >&2
    elif ((GPUS_FOUND < 4)); then
        NUM_GPUS=$GPUS_FOUND
        echo "run.sh: $GPUS_FOUND GPU(s) found, the recipe assumes 4: NUM_GPUS=$GPUS_FOUND (the global batch" \
             "stays 128)" >&2
    else
        NUM_GPUS=4
    fi
elif ((GPUS_FOUND == 0)); then
    device_args=(--device cpu)
    echo "run.sh: no GPU found (nvidia-smi): NUM_GPUS=$NUM_GPUS CPU processes (gloo), as asked" >&2
elif ((NUM_GPUS > GPUS_FOUND)); then
    echo "run.sh: NUM_GPUS=$NUM_GPUS but this node has $GPUS_FOUND GPU(s) (nvidia-smi, CUDA_VISIBLE_DEVICES):" \
         "set NUM_GPUS=$GPUS_FOUND or less" >&2
    exit 2
fi
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
NUM_WORKERS=${NUM_WORKERS:-8}        # DataLoader workers per process
PRECISION=${PRECISION:-bf16}         # bf16 (docs/precision_memory.md; Ampere or newer) | fp32 (released) | fp16
EVAL_PRECISION=${EVAL_PRECISION:-fp32}  # validation/test evaluation (fp32 reproduces published numbers)

# ---- data (docs/design.md §9); videos may be compressed first (preprocess/compress_video.py)
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

OUTPUT_DIR=${OUTPUT_DIR:-ckpts/${DATATYPE}_${PRESET:-avigate}}

args=(
    --do_train --datatype "$DATATYPE"
    --data_path "$DATA_PATH" --features_path "$VIDEO_PATH" --audio_path "$AUDIO_PATH"
    --train_csv "$TRAIN_CSV" --test_csv "$TEST_CSV"
    --output_dir "$OUTPUT_DIR"
    --epochs 5 --batch_size "$batch" --batch_size_val 16 --lr 1e-4 --coef_lr 1e-3
    --max_words "$words" --feature_framerate 1 --slice_framepos 2 --freeze_layer_num 0
    --margin_BD "$MARGIN_BD" --beta "$BETA"
    --precision "$PRECISION" --eval_precision "$EVAL_PRECISION" --num_thread_reader "$NUM_WORKERS" --save_every_steps 500
)
# The architecture and its weights; a preset that starts from a checkpoint takes them from the
# checkpoint's record instead (an explicit flag there must agree with it).
if [[ $preset_from_checkpoint == 0 ]]; then
    args+=(--pretrained_clip_name "$CLIP_NAME" --ast_checkpoint "$AST_CHECKPOINT"
           --max_frames "$frames" --cross_num_hidden_layers 4 --audio_query_layers 4
           --gate "$GATE" --fusion_residual "$FUSION_RESIDUAL")
fi
if [[ -n "$every_caption" ]]; then args+=("$every_caption"); fi
if [[ -n "$VAL_CSV" ]]; then args+=(--val_csv "$VAL_CSV"); fi
read -r -a text_guided <<< "$TEXT_GUIDED"

flags=("${args[@]}" ${device_args[@]+"${device_args[@]}"} ${preset_args[@]+"${preset_args[@]}"}
       ${text_guided[@]+"${text_guided[@]}"} "$@")
command=(torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NUM_GPUS"
         --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT"
         main_task_retrieval.py "${flags[@]}")
if [[ $DRY_RUN == 1 ]]; then
    printf '%q ' "${command[@]}"
    echo
    exit 0
fi
# One process checks flags, data and weights before the ranks start: one error, printed once.
WORLD_SIZE=$((NNODES * NUM_GPUS)) python main_task_retrieval.py "${flags[@]}" --check_only
"${command[@]}"
