"""The sparse-parity sandbox of METHODS.md §2 (`pocl-ray parity`): curriculum extraction against
one-shot KD and progressive distillation on MLPs.

- `sandbox`: the pure core (data, models, one teacher run, one student run, summary, plot), no Ray;
- `config`: its YAML config, with field-named errors;
- `runner`: the Ray runner, one task per teacher and per (seed, method) student.
"""
