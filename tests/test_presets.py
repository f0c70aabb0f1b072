"""`--preset quick` (issue 14, item 4): a first hour on one Spark, with overrides on top of it."""

import dataclasses

import pytest

import ppo
import reward
import sft
from dgx_spark_summary_from_human_feedback import cli, pipeline
from dgx_spark_summary_from_human_feedback.errors import InputError


@pytest.mark.parametrize("stage", [sft, reward, ppo])
def test_quick_preset_names_only_config_fields_and_keeps_the_recipe_model(stage):
    quick = stage.PRESETS["quick"]
    assert set(quick) <= {f.name for f in dataclasses.fields(stage.Config)}
    cfg = cli.parse(stage.Config, ["--preset", "quick"], stage.PRESETS)
    assert cfg.preset == "quick" and cfg.output_dir.startswith("out/quick/")
    default = stage.Config()
    for name in (
        "model",
        "dataset",
        "base_model",
        "precision",
        "optimizer",
    ):  # the recipe's model, Hub data and numerics
        if hasattr(default, name):
            assert getattr(cfg, name) == getattr(default, name), name


def test_quick_sizes_are_a_slice_of_the_recipe():
    s, r, p = (cli.parse(m.Config, ["--preset", "quick"], m.PRESETS) for m in (sft, reward, ppo))
    assert (
        s.max_steps == s.decay_steps and s.max_steps * s.batch_size < 116_722 // 4
    )  # cosine completes within the slice
    assert r.max_steps * r.batch_size < 92_858 // 10 and r.max_final_eval_rows and r.num_norm_rows
    assert (
        p.total_episodes // p.batch_size >= 16
        and p.ppo_epochs == ppo.Config().ppo_epochs
        and p.kl_coef == ppo.Config().kl_coef
    )
    assert (
        r.sft_path == s.output_dir and p.sft_path == s.output_dir and p.reward_path == r.output_dir
    )  # stages find each other


def test_overrides_win_over_the_quick_preset(tmp_path):
    cfg = cli.parse(
        sft.Config,
        ["--preset", "quick", "--model", str(tmp_path), "--dataset", "data/sft", "--max-steps", "3"],
        sft.PRESETS,
    )
    assert (cfg.model, cfg.dataset, cfg.max_steps, cfg.decay_steps) == (str(tmp_path), "data/sft", 3, 120)
    cfg = cli.parse(
        ppo.Config,
        ["--preset", "quick", "--sft-path", "a", "--reward-path", "b", "--total-episodes", "128"],
        ppo.PRESETS,
    )
    assert (cfg.sft_path, cfg.reward_path, cfg.total_episodes, cfg.batch_size) == ("a", "b", 128, 64)


def test_pipeline_quick_runs_ppo_only(tmp_path):
    with pytest.raises(InputError, match="--preset quick sizes SFT, reward model and PPO only"):
        pipeline.main(pipeline.Config(preset="quick", methods="ppo,dpo", output_dir=str(tmp_path)))
