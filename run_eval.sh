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
#
# Variables (default in brackets):
#   CHECKPOINT [required]  the pytorch_model.bin.N file to evaluate
#   DATATYPE [msrvtt]      msrvtt | vatex | charades
#   DATA_PATH [data/$DATATYPE]            annotation files;  TEST_CSV [the datatype's test file]
#   VIDEO_PATH [data/$DATATYPE/videos]    <video_id>.mp4 files
#   AUDIO_PATH [data/$DATATYPE/audio]     <video_id>.wav files (preprocess/extract_audio.py)
#   AUDIO_FEATURE_CACHE [""]  AST token cache (preprocess/cache_audio_features.py) read instead of AUDIO_PATH
#   PRECISION [fp32]       evaluation autocast (--eval_precision): fp32 reproduces the published numbers;
#                          bf16 is faster and moves some ranks (docs/first_hour.md)
#   EVAL_PROTOCOL [honest] paired_block = the LEAKING public protocol
#   AUDIO_PERTURB [none]   none | silence | noise | swap (robustness)
#   RERANK_TOPK [0]        text-guided: fuse only each text's/video's top K (0: every pair)
#   MAX_WORDS [32]         caption tokens
#   NUM_GPUS [1]           processes;  NUM_WORKERS [8] loader workers per process
#   CLIP_NAME, AST_CHECKPOINT, TEXT_GUIDED, GATE, FUSION_RESIDUAL, MAX_FRAMES, PADDING_RULE [""]
#                          architecture and weights; empty = from the checkpoint's record
#   OUTPUT_DIR [<checkpoint dir>/eval_<file>_<precision>_<protocol>[_audio-<perturb>][_rerank<K>]
#               [_cache][_args-<checksum of the extra arguments>]; _2, _3, ... when that one holds results]
set -euo pipefail
cd "$(dirname "$0")"

if [[ ${1:-} == --help || ${1:-} == -h ]]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    echo "Flags of main_task_retrieval.py: python main_task_retrieval.py --help"
    exit 0
fi

CHECKPOINT=${CHECKPOINT:?set CHECKPOINT to a pytorch_model.bin.N file (bash run_eval.sh --help lists the variables)}
NUM_GPUS=${NUM_GPUS:-1}
NUM_WORKERS=${NUM_WORKERS:-8}
PRECISION=${PRECISION:-fp32}         # --eval_precision; scores are fp32 either way

DATATYPE=${DATATYPE:-msrvtt}                         # msrvtt | vatex | charades
DATA_PATH=${DATA_PATH:-data/$DATATYPE}
VIDEO_PATH=${VIDEO_PATH:-data/$DATATYPE/videos}
AUDIO_PATH=${AUDIO_PATH:-data/$DATATYPE/audio}
AUDIO_FEATURE_CACHE=${AUDIO_FEATURE_CACHE:-}         # AST token cache, read instead of AUDIO_PATH
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
PADDING_RULE=${PADDING_RULE:-}                       # masked | released

# The default output folder names the evaluation's settings, so that two evaluations of one
# checkpoint never share a folder; a folder already holding results gets a number.
default_output_dir() {
    local settings="${PRECISION}_${EVAL_PROTOCOL}"
    if [[ $AUDIO_PERTURB != none ]]; then settings+="_audio-$AUDIO_PERTURB"; fi
    if [[ $RERANK_TOPK != 0 ]]; then settings+="_rerank$RERANK_TOPK"; fi
    if [[ -n $AUDIO_FEATURE_CACHE ]]; then settings+="_cache"; fi
    if (($#)); then settings+="_args-$(printf '%s\n' "$@" | cksum | cut -d' ' -f1)"; fi
    local base number=2
    base=$(dirname "$CHECKPOINT")/eval_$(basename "$CHECKPOINT")_$settings
    local dir=$base
    while [[ -e $dir/metrics.json || -e $dir/sim_matrix.npy ]]; do
        dir=${base}_$number
        number=$((number + 1))
    done
    echo "$dir"
}
OUTPUT_DIR=${OUTPUT_DIR:-$(default_output_dir "$@")}
echo "run_eval.sh: writing to $OUTPUT_DIR" >&2

args=(
    --do_eval --datatype "$DATATYPE" --init_model "$CHECKPOINT"
    --data_path "$DATA_PATH" --features_path "$VIDEO_PATH"
    --output_dir "$OUTPUT_DIR"
    --batch_size_val 16 --max_words "$MAX_WORDS" --feature_framerate 1 --slice_framepos 2
    --eval_protocol "$EVAL_PROTOCOL" --audio_perturb "$AUDIO_PERTURB" --eval_precision "$PRECISION"
    --num_thread_reader "$NUM_WORKERS"
)
if [[ -n "$AUDIO_FEATURE_CACHE" ]]; then
    args+=(--audio_feature_cache "$AUDIO_FEATURE_CACHE")
else
    args+=(--audio_path "$AUDIO_PATH")
fi
if [[ -n "$TEST_CSV" ]]; then args+=(--test_csv "$TEST_CSV"); fi
if [[ "$RERANK_TOPK" != 0 ]]; then args+=(--rerank_topk "$RERANK_TOPK"); fi
if [[ -n "$CLIP_NAME" ]]; then args+=(--pretrained_clip_name "$CLIP_NAME"); fi
if [[ -n "$AST_CHECKPOINT" ]]; then args+=(--ast_checkpoint "$AST_CHECKPOINT"); fi
if [[ -n "$GATE" ]]; then args+=(--gate "$GATE"); fi
if [[ -n "$FUSION_RESIDUAL" ]]; then args+=(--fusion_residual "$FUSION_RESIDUAL"); fi
if [[ -n "$MAX_FRAMES" ]]; then args+=(--max_frames "$MAX_FRAMES"); fi
if [[ -n "$PADDING_RULE" ]]; then args+=(--padding_rule "$PADDING_RULE"); fi
read -r -a text_guided <<< "$TEXT_GUIDED"
flags=("${args[@]}" ${text_guided[@]+"${text_guided[@]}"} "$@")

if ((NUM_GPUS > 1)); then  # one process checks flags, data and weights: one error, printed once
    WORLD_SIZE=$NUM_GPUS python main_task_retrieval.py "${flags[@]}" --check_only
fi
torchrun --standalone --nproc_per_node "$NUM_GPUS" main_task_retrieval.py "${flags[@]}"
