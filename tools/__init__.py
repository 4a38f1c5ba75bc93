"""Command-line tools that work on checkpoints and evaluation outputs (``python -m tools.<name>``):
``audit_protocol`` (is a score independent of order, batching and sharding?) and
``error_report`` (the worst queries of a ``--dump_topk`` evaluation as Markdown)."""
