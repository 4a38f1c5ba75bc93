"""The synthetic audio-visual benchmark's tooling (docs/synthetic_benchmark.md): the clip
generator (make_synthetic_av), its vocabulary and sound synthesizers (vocab), tiny CLIP/AST
checkpoints in the released formats (make_tiny_checkpoints), the audio trunk's short
supervised pre-training (pretrain_audio_trunk), the category-shortcut control cache
(category_audio_cache) and the demo that builds, trains and evaluates it all (demo, ``make demo``;
its aggregation: demo_results). Real data needs none of it (see preprocess/)."""
