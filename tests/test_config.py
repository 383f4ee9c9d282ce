"""pocl_ray.config: YAML loading, field-named errors, cross-field checks, dotted overrides."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from pocl_ray.config import ConfigError, HFDataset, RunConfig, load_config, parse_config
from pocl_ray.hf_datasets import requested_splits

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

MINIMAL = {"data": {"train": "data/train.jsonl"}, "models": {"teacher": "models/teacher"}}


def _with(section: str, **values) -> dict:
    return {**MINIMAL, section: {**MINIMAL.get(section, {}), **values}}


def test_load_yaml_fills_defaults_and_round_trips(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "name: demo\n"
        "data: {train: data/train.jsonl, max_length: 256, max_prompt_length: 128}\n"
        "models: {teacher: models/teacher}\n"
        "kd: {loss: srkl}\n"
        "training: {num_workers: 2, micro_batch_size: 4, global_batch_size: 32}\n"
    )
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    assert (cfg.name, cfg.kd.loss, cfg.data.max_length) == ("demo", "srkl", 256)
    assert cfg.training.global_batch_size // (cfg.training.micro_batch_size * cfg.training.num_workers) == 4
    assert cfg.curriculum.num_buckets == 4 and cfg.data.fields.response == ["response", "output"]
    again = tmp_path / "again.yaml"
    again.write_text(cfg.to_yaml())
    assert load_config(again) == cfg


def test_unknown_key_names_the_dotted_path():
    with pytest.raises(ConfigError) as err:
        parse_config(_with("curriculum", num_bucket=4))
    assert "curriculum.num_bucket: unknown key" in str(err.value)
    with pytest.raises(ConfigError, match=r"data\.fields\.answer: unknown key"):
        parse_config({**MINIMAL, "data": {"train": "x", "fields": {"answer": ["a"]}}})


def test_a_retired_key_names_its_replacement():
    with pytest.raises(ConfigError, match=r"tune\.grace_stages: replaced by tune\.grace_samples"):
        parse_config(_with("tune", grace_stages=1))
    with pytest.raises(ConfigError, match=r"kd\.chunk_size: renamed kd\.chunk_positions"):
        parse_config(_with("kd", chunk_size=128))


def test_invalid_literal_names_the_field_and_the_allowed_values():
    with pytest.raises(ConfigError) as err:
        parse_config(_with("kd", loss="kld"))
    message = str(err.value)
    assert "kd.loss:" in message and "(got 'kld')" in message
    for allowed in ("fkl", "rkl", "js", "tvd", "skl", "srkl", "akl"):
        assert f"'{allowed}'" in message


def test_actor_counts_are_positive_or_auto():
    assert parse_config(_with("scoring", num_actors="auto")).scoring.num_actors == "auto"
    assert parse_config(_with("eval", num_actors=4)).eval.num_actors == 4
    for section, bad in (("scoring", 0), ("eval", "many")):
        with pytest.raises(ConfigError) as err:
            parse_config(_with(section, num_actors=bad))
        assert f"{section}.num_actors" in str(err.value) and "'auto'" in str(err.value)


def test_missing_required_field_is_named():
    with pytest.raises(ConfigError, match=r"models\.teacher: Field required"):
        parse_config({"data": {"train": "x"}, "models": {}})


def test_a_worker_count_that_does_not_divide_the_batch_splits_it_unevenly():
    # 60 rows a step over 2 workers of micro-batch 8: 30 rows each in 4 micro-batches (the last of 6 rows);
    # 16 over 3: 6, 5 and 5 (shards.worker_shard), the loss still over the global token count.
    cfg = parse_config(_with("training", global_batch_size=60, micro_batch_size=8, num_workers=2))
    assert cfg.training.global_batch_size == 60 and cfg.training.num_workers == 2
    assert (
        parse_config(_with("training", global_batch_size=16, micro_batch_size=4, num_workers=3)).training.num_workers
        == 3
    )


def test_elastic_worker_range_and_its_settings():
    cfg = parse_config(_with("training", num_workers=[1, 3], global_batch_size=16, micro_batch_size=4))
    # A range splits the global batch unevenly where a count does not divide it (16 over 3 workers).
    assert cfg.training.num_workers == (1, 3) and cfg.training.max_workers == 3
    assert parse_config(cfg.model_dump(mode="json")).training.num_workers == (1, 3)
    assert parse_config(_with("training", resize_check_s=5)).training.resize_check_s == 5
    with pytest.raises(ConfigError, match=r"training\.num_workers: \[min, max\] needs min <= max, got \[3, 1\]"):
        parse_config(_with("training", num_workers=[3, 1]))
    with pytest.raises(ConfigError, match=r"training\.num_workers\b.*greater than or equal to 1"):
        parse_config(_with("training", num_workers=[0, 2]))
    with pytest.raises(ConfigError, match=r"training\.resize_check_s"):
        parse_config(_with("training", resize_check_s=0))


def test_prompt_must_leave_room_for_the_response():
    with pytest.raises(ConfigError, match=r"max_prompt_length \(512\) must be smaller than max_length \(512\)"):
        parse_config({**MINIMAL, "data": {"train": "x", "max_prompt_length": 512, "max_length": 512}})


def test_steps_per_stage_replaces_the_epochs_default_and_survives_round_trips():
    cfg = parse_config(_with("curriculum", steps_per_stage=10))
    assert (cfg.curriculum.steps_per_stage, cfg.curriculum.epochs_per_stage) == (10, None)
    assert cfg.with_overrides({"kd.loss": "rkl"}).curriculum.steps_per_stage == 10
    assert parse_config(yaml.safe_load(cfg.to_yaml())) == cfg
    default = parse_config(MINIMAL)
    assert (default.curriculum.steps_per_stage, default.curriculum.epochs_per_stage) == (None, 8.0)
    assert default.with_overrides({"curriculum.steps_per_stage": 5}).curriculum.steps_per_stage == 5


def test_with_overrides():
    cfg = parse_config(MINIMAL)
    new = cfg.with_overrides({"kd.loss": "rkl", "curriculum.num_buckets": 8, "data.fields.id": ["uid"]})
    assert (new.kd.loss, new.curriculum.num_buckets, new.data.fields.id) == ("rkl", 8, ["uid"])
    assert (cfg.kd.loss, cfg.curriculum.num_buckets) == ("fkl", 4)  # the original is unchanged
    with pytest.raises(ConfigError, match=r"kd\.temperature: no such config field"):
        cfg.with_overrides({"kd.temperature": 2.0})
    with pytest.raises(ConfigError, match=r"curriculum\.num_buckets: Input should be greater than or equal to 1"):
        cfg.with_overrides({"curriculum.num_buckets": 0})


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(listing)
    typo = tmp_path / "typo.yaml"
    typo.write_text("data: {train: x}\nmodels: {teacher: t}\nkd: {los: fkl}\n")
    with pytest.raises(ConfigError, match=rf"invalid config \({re.escape(str(typo))}\):\n  kd\.los: unknown key"):
        load_config(typo)


# -- paths: a URI is refused where the code writes local files, kept where storage.py / Ray read it --


@pytest.mark.parametrize(
    ("section", "values", "field"),
    [
        (
            "output",
            {"trackers": ["tensorboard"], "tensorboard": {"log_dir": "s3://b/tb"}},
            "output.tensorboard.log_dir",
        ),
        ("output", {"trackers": ["wandb"], "wandb": {"dir": "gs://b/wandb"}}, "output.wandb.dir"),
    ],
)
def test_a_uri_in_a_local_path_setting_is_refused_naming_the_field(section, values, field):
    with pytest.raises(ConfigError) as err:
        parse_config({**MINIMAL, section: values})
    line = next(x for x in str(err.value).splitlines() if x.strip().startswith(f"{field}:"))
    assert "a URI is not supported here" in line and "://" in line  # the value is shown too


def test_data_and_model_settings_keep_a_uri_or_a_hub_id():
    cfg = parse_config(
        {
            **MINIMAL,
            "data": {"train": "s3://bucket/train.jsonl", "dev": "gs://bucket/dev.jsonl"},
            "models": {
                "teacher": "org/teacher",
                "revision": "v1",
                "student": "s3://b/student",
                "tokenizer": "file:///t",
            },
            "eval": {"sets": [{"name": "dolly", "path": "gs://bucket/dolly.jsonl"}]},
            "curriculum": {"plan": "progressive", "progressive": {"teacher_checkpoints": ["ck/1", "gs://b/ck/2"]}},
        }
    )
    assert (cfg.data.train, cfg.data.dev, cfg.eval.sets[0].path) == (
        "s3://bucket/train.jsonl",
        "gs://bucket/dev.jsonl",
        "gs://bucket/dolly.jsonl",
    )
    assert (cfg.models.teacher, cfg.models.revision, cfg.models.student) == ("org/teacher", "v1", "s3://b/student")
    assert cfg.curriculum.progressive.teacher_checkpoints == ["ck/1", "gs://b/ck/2"]


def test_storage_path_and_output_dir_keep_a_uri_and_local_paths_stay_local():
    cfg = parse_config(
        {**MINIMAL, "training": {"storage_path": "s3://bucket/checkpoints"}, "output": {"dir": "gs://b/runs/x"}}
    )
    assert (cfg.training.storage_path, cfg.output.dir) == ("s3://bucket/checkpoints", "gs://b/runs/x")
    # Not URIs: a colon elsewhere in a local path, a Windows drive.
    local = parse_config(
        {**MINIMAL, "output": {"dir": "runs/2026-11-30T20:00"}, "models": {"teacher": "C:\\models\\t"}}
    )
    assert (local.output.dir, local.models.teacher) == ("runs/2026-11-30T20:00", "C:\\models\\t")


@pytest.mark.parametrize(
    ("section", "values", "field", "error"),
    [
        ("training", {"storage_path": "s3://AKIAFAKE:fake-secret@bucket/ck"}, "training.storage_path", "credential"),
        ("training", {"storage_path": "s3://bucket/ck?secret_key=fake-secret"}, "training.storage_path", "credential"),
        ("training", {"storage_path": "hdfs://namenode/ck"}, "training.storage_path", "unsupported URI scheme"),
        ("data", {"train": "hf://datasets/org/x"}, "data.train", "unsupported URI scheme 'hf'"),
        ("output", {"dir": "s3://AKIAFAKE:fake-secret@bucket/runs"}, "output.dir", "credential"),
        ("models", {"teacher": "s3://AKIAFAKE:fake-secret@bucket/teacher"}, "models.teacher", "credential"),
    ],
)
def test_a_bad_uri_or_a_pending_setting_is_refused_naming_the_field(section, values, field, error):
    with pytest.raises(ConfigError) as err:
        parse_config({**MINIMAL, section: values})
    line = next(x for x in str(err.value).splitlines() if x.strip().startswith(f"{field}:"))
    assert error in line
    assert "fake-secret" not in str(err.value), "a refused credential is never echoed"


# -- curriculum: the extraction/progressive plans' own settings ---------------------------------


def test_output_kd_settings_default_to_plain_kd_and_are_checked():
    cfg = parse_config(MINIMAL)
    assert (cfg.curriculum.output_kd.temperature, cfg.curriculum.output_kd.kd_weight) == (1.0, 1.0)
    assert cfg.curriculum.data_curriculum == "none" and cfg.curriculum.progressive.final_steps is None
    with pytest.raises(ConfigError, match=r"curriculum\.output_kd\.kd_weight: Input should be less than or equal to 1"):
        parse_config(_with("curriculum", output_kd={"kd_weight": 1.5}))
    with pytest.raises(ConfigError, match=r"curriculum\.output_kd\.temperature: Input should be greater than 0"):
        parse_config(_with("curriculum", output_kd={"temperature": 0}))


@pytest.mark.parametrize("plan", ["pocl", "baseline", "sft"])
def test_data_curriculum_is_refused_on_plans_with_their_own_pools(plan):
    with pytest.raises(ConfigError) as err:
        parse_config(_with("curriculum", plan=plan, data_curriculum="pocl"))
    assert (
        f"curriculum.data_curriculum: 'pocl' applies to the extraction and progressive plans only; plan {plan!r}"
    ) in str(err.value)


def test_data_curriculum_on_extraction_and_a_later_plan_override():
    cfg = parse_config(_with("curriculum", plan="extraction", data_curriculum="pocl"))
    assert cfg.curriculum.data_curriculum == "pocl"
    # A sweep or compare override that switches the plan is checked as well.
    with pytest.raises(ConfigError, match=r"curriculum\.data_curriculum: .*plan 'pocl'"):
        cfg.with_overrides({"curriculum.plan": "pocl"})


def test_progressive_plan_needs_teacher_checkpoints():
    with pytest.raises(ConfigError, match=r"curriculum: progressive\.teacher_checkpoints is empty"):
        parse_config(_with("curriculum", plan="progressive"))
    cfg = parse_config(_with("curriculum", plan="progressive", progressive={"teacher_checkpoints": ["ck/1"]}))
    assert cfg.curriculum.progressive.teacher_checkpoints == ["ck/1"]


def test_data_sources_are_paths_or_datasets_by_name_with_field_named_errors():
    by_name = {"dataset": "org/chats", "split": "train[:100]", "subset": "multi-turn"}
    cfg = parse_config(
        {**MINIMAL, "data": {"train": by_name, "dev": "dev.jsonl"}, "eval": {"sets": [{"name": "e", "path": by_name}]}}
    )
    assert isinstance(cfg.data.train, HFDataset) and cfg.data.train.subset == "multi-turn"
    assert cfg.data.dev == "dev.jsonl" and cfg.eval.sets[0].path == cfg.data.train
    assert parse_config(yaml.safe_load(cfg.to_yaml())) == cfg
    assert cfg.with_overrides({"data.train": "other.jsonl"}).data.train == "other.jsonl"
    with pytest.raises(ConfigError) as err:
        parse_config(
            {**MINIMAL, "data": {"train": {"dataset": "org/chats"}}, "eval": {"sets": [{"name": "e", "path": 3}]}}
        )
    assert str(err.value).splitlines()[1:] == [
        "  data.train.split: Field required",
        "  eval.sets.0.path: Input should be a valid string (got 3)",
    ]
    with pytest.raises(ConfigError, match=r"data\.row_form: Input should be 'auto', 'instruction' or 'conversation'"):
        parse_config(_with("data", row_form="sharegpt"))
    with pytest.raises(ConfigError, match=r"data\.train_on: Input should be 'all_assistant' or 'last_assistant'"):
        parse_config(_with("data", train_on="assistant"))


def test_the_conversational_example_configs_load():
    """The Qwen2.5 pair on datasets by name (it needs the Hub and GPUs, so only its config is checked
    here) and the quickstart's conversational twin, which differs from the quickstart only in its data."""
    qwen = load_config(CONFIGS / "qwen2.5-7b-to-0.5b-chat.yaml")
    assert qwen.data.row_form == "conversation" and qwen.data.train_on == "all_assistant"
    sources = [qwen.data.train, qwen.data.dev, *(s.path for s in qwen.eval.sets)]
    assert all(isinstance(s, HFDataset) for s in sources)
    assert [requested_splits(s.split) for s in sources] == [["train"], ["test"], ["test"], ["test_sft"]]
    assert qwen.models.teacher.endswith("Qwen2.5-7B-Instruct") and qwen.models.student.endswith("Qwen2.5-0.5B-Instruct")
    assert qwen.data.max_prompt_length < qwen.data.max_length

    twin, quickstart = load_config(CONFIGS / "quickstart-chat.yaml"), load_config(CONFIGS / "quickstart.yaml")
    for section in ("scoring", "curriculum", "kd", "training", "pipeline"):
        assert getattr(twin, section) == getattr(quickstart, section), section
    assert twin.eval.model_copy(update={"sets": []}) == quickstart.eval.model_copy(update={"sets": []})
    for path in (twin.data.train, twin.data.dev, *(s.path for s in twin.eval.sets)):
        assert (CONFIGS.parent / path).is_file(), path


def test_the_bucket_example_config_names_every_path_in_a_bucket_and_models_by_hub_id():
    """configs/qwen2.5-1.5b-to-0.5b-bucket.yaml (needs a bucket, the Hub and GPUs: its config only is checked
    here; tests/test_hub_and_bucket_inputs.py runs the same layout against a local S3 server)."""
    cfg = load_config(CONFIGS / "qwen2.5-1.5b-to-0.5b-bucket.yaml")
    paths = [cfg.data.train, cfg.data.dev, cfg.output.dir, *(s.path for s in cfg.eval.sets)]
    assert all(isinstance(p, str) and p.startswith("s3://my-bucket/") for p in paths), paths
    assert (cfg.models.teacher, cfg.models.student, cfg.models.revision) == (
        "Qwen/Qwen2.5-1.5B-Instruct",
        "Qwen/Qwen2.5-0.5B-Instruct",
        "main",
    )
    assert cfg.training.storage_path is None and not cfg.output.trackers  # checkpoints beside the outputs
