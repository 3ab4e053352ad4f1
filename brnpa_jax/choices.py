"""The names a config may choose from where the room that uses them sits
above the validation pass (``config_check``): the trainer's optimisers and
schedules, the tasks and the few-shot options.

It imports nothing, so the losses and steps that read these names import
without ``ml_collections`` or the data readers (as the GPU suite's workers
need), and ``config_check`` checks a config against the same tuples.
"""

OPTIMIZERS = ("sgd", "adam", "adamw", "amsgrad")
SCHEDULES = ("constant", "step", "cosine")
TASKS = ("classification", "distill", "fewshot", "reid")
FEWSHOT_PHASES = ("pretrain", "episodic")
FEWSHOT_METRICS = ("euclidean", "cosine")
