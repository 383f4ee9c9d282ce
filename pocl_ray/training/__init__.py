"""Distillation along a curriculum plan on Ray Train, in three modules (import them directly):

- `step`: one optimizer step, pure torch: rows -> batches -> both models' outputs -> loss terms ->
  gradients -> optimizer step; the dev losses;
- `worker`: one Ray Train worker: set-up, the stage loop, the end-of-step events, checkpoints;
- `driver`: `train`: the checks before any Ray work, the coordinator actor, the TorchTrainer, the
  exported students;
and `teacher`, the one interface through which the step reads its teacher (online or cached).
"""
