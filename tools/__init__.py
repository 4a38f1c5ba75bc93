"""Command-line tools that work on checkpoints and evaluation outputs (``python -m tools.<name>``):
``audit_protocol`` (is every score independent of order, batching and sharding?),
``robustness_table`` (t2v R@1 and gates under ``--audio_perturb``), ``error_report`` (the
worst queries of a ``--dump_topk`` evaluation as Markdown) and ``probe_sound`` (linear probes:
which stage of a checkpoint still knows the sound, docs/diagnostics.md); on the hardware:
``gpu_check`` (``make gpu-check``), ``pair_memory`` (bytes per fused pair) and
``precision_agreement`` (bf16 against fp32 training), docs/precision_memory.md."""
