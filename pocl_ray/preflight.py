"""Every input a run reads, checked on the driver before any Ray work (`pocl-ray run`, `score`, `train`,
`eval`, `tune`): the data files and the scores (local paths or object-storage URIs) are readable, and
every model setting is resolved once, here, to a pinned `ModelSource` (model_source.py: a local folder, a
Hub id pinned to a commit, a URI pinned to a version of its files).

The stages get those sources: their workers and actors load the models from them, so every node loads the
same weights even if a Hub repo moves during the run; manifests and plans record `source.record()`.
An error names the setting and the path or id: a missing file or object, refused credentials, an
unreachable store, a Hub id not in the cache while offline (storage.py, model_source.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

from pocl_ray import storage
from pocl_ray.config import RunConfig, is_uri
from pocl_ray.curriculum import Plan
from pocl_ray.model_source import ModelSource, resolve_model

TEACHER, STUDENT, TOKENIZER = "models.teacher", "models.student", "models.tokenizer"

# setting -> the model it names, resolved (see checkpoint_setting for the progressive teachers).
Sources = dict[str, ModelSource]


def checkpoint_setting(index: int) -> str:
    return f"curriculum.progressive.teacher_checkpoints[{index}]"


def data_paths(cfg: RunConfig, scores: str | Path | None = None, training: bool = False) -> dict[str, str]:
    """setting -> the file or folder it names, for every data input cfg lists (datasets by name are
    `hf_datasets`' to check). `training`: the training command, whose rows come from the scores, so it
    does not read data.train."""
    paths: dict[str, object] = (
        {"data.dev": cfg.data.dev} if training else {"data.train": cfg.data.train, "data.dev": cfg.data.dev}
    )
    paths.update({f"eval.sets[{i}].path": s.path for i, s in enumerate(cfg.eval.sets)})
    paths["--scores"] = scores
    return {setting: str(path) for setting, path in paths.items() if isinstance(path, (str, Path))}


def check_data(cfg: RunConfig, scores: str | Path | None = None, training: bool = False) -> None:
    """Each data input the command reads exists and this process may read it, or an error naming its setting;
    an output.dir in object storage takes a write (a local one is created by the first write)."""
    for setting, path in data_paths(cfg, scores, training).items():
        storage.check_readable(path, setting)
    if is_uri(cfg.output.dir):
        storage.check_writable(cfg.output.dir, "output.dir")


def model_sources(cfg: RunConfig, known: Mapping[str, ModelSource] | None = None) -> Sources:
    """Every model cfg names, resolved: the teacher at models.revision, the tokenizer (default: the
    teacher's source), the student when set, each progressive teacher checkpoint. `known`: the sources
    of the config cfg derives from (a compared run, a Tune trial), whose models section cfg shares: only
    cfg's own teacher checkpoints (a curriculum setting) are resolved, the rest is pinned once for all."""
    if known is not None:
        sources = {k: known[k] for k in (TEACHER, STUDENT, TOKENIZER) if k in known}
    else:
        m = cfg.models
        teacher = resolve_model(m.teacher, TEACHER, m.revision)
        tokenizer = teacher if m.tokenizer is None else resolve_model(m.tokenizer, TOKENIZER)
        sources = {TEACHER: teacher, TOKENIZER: tokenizer}
        if m.student is not None:
            sources[STUDENT] = resolve_model(m.student, STUDENT)
    for i, value in enumerate(cfg.curriculum.progressive.teacher_checkpoints):
        sources[checkpoint_setting(i)] = resolve_model(value, checkpoint_setting(i))
    return sources


def check_inputs(cfg: RunConfig, scores: str | Path | None = None, training: bool = False) -> Sources:
    """`check_data`, then `model_sources`: the one preflight of a command."""
    check_data(cfg, scores, training)
    return model_sources(cfg)


def stage_sources(cfg: RunConfig, plan: Plan, sources: Mapping[str, ModelSource]) -> Sources:
    """The teacher of each plan stage that names one, by the value the plan names it by: a progressive
    checkpoint of cfg as `sources` resolved it, the run's teacher when it is the same model (loaded
    once), else (a plan handed to `train` directly) resolved here, naming the stage in an error."""
    checkpoints = cfg.curriculum.progressive.teacher_checkpoints
    teacher = sources[TEACHER]
    out: Sources = {}
    for stage in plan.stages:
        if stage.teacher is None or stage.teacher in out:
            continue
        if stage.teacher in checkpoints:
            source = sources[checkpoint_setting(checkpoints.index(stage.teacher))]
        else:
            source = resolve_model(stage.teacher, f"curriculum plan stage {stage.index} teacher")
        out[stage.teacher] = teacher if source.record() == teacher.record() else source
    return out


def records(sources: Mapping[str, ModelSource]) -> dict[str, dict]:
    """What a manifest or plan records: setting -> {kind, location, revision}."""
    return {setting: source.record() for setting, source in sources.items()}


def describe(model: dict | str | None) -> str:
    """A manifest's model entry in one line: the location, with the revision it was pinned to (a Hub
    commit, a URI's version key); an older manifest's plain path or a "cut from teacher" note as is."""
    if not isinstance(model, dict):
        return str(model)
    return model["location"] + (f" (revision {model['revision']})" if model.get("revision") else "")


def to_wire(sources: Mapping[str, ModelSource]) -> dict[str, dict]:
    """Plain dicts for a worker's config (Ray Train's train_loop_config); `from_wire` rebuilds them."""
    return {setting: asdict(source) for setting, source in sources.items()}


def from_wire(wired: Mapping[str, dict]) -> Sources:
    return {setting: ModelSource(**fields) for setting, fields in wired.items()}
