"""A run and its report: the compress -> measure -> report pipeline, the ``flatten`` command, the run record
and model card, ``flatten reproduce`` and LoRA recovery."""
