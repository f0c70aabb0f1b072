"""Shared training pieces: lr schedule, optimizer groups, batching, checkpoints, the logger."""

import dataclasses
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from dgx_spark_summary_from_human_feedback import tiny
from dgx_spark_summary_from_human_feedback.checkpoint import (
    RESUME_SAFE_FIELDS,
    STATE_FILE,
    check_resume_config,
    latest_checkpoint,
    load_state,
    resume_point,
    save_checkpoint,
)
from dgx_spark_summary_from_human_feedback.errors import InputError
from dgx_spark_summary_from_human_feedback.tracking import Logger, read_metrics
from dgx_spark_summary_from_human_feedback.training import (
    batch_indices,
    get_lr,
    make_optimizer,
    micro_batch_layout,
    micro_batches,
    setup_runtime,
)

from .conftest import REPO
from .stage_fixtures import load_script

SCHEDULE = dict(lr=1e-3, min_lr=1e-4, warmup_steps=10, decay_steps=110)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny.model_config())


# ---- learning rate


def test_warmup_starts_at_lr_over_warmup_plus_one_and_rises_linearly():
    lrs = [get_lr(s, **SCHEDULE) for s in range(SCHEDULE["warmup_steps"])]
    assert lrs[0] == pytest.approx(1e-3 / 11)
    steps = [b - a for a, b in zip(lrs, lrs[1:])]
    assert all(d == pytest.approx(1e-3 / 11) for d in steps)


def test_peak_right_after_warmup_then_cosine_to_min_lr_and_flat():
    assert get_lr(10, **SCHEDULE) == pytest.approx(1e-3)
    assert get_lr(60, **SCHEDULE) == pytest.approx((1e-3 + 1e-4) / 2)  # cosine midpoint
    assert get_lr(35, **SCHEDULE) == pytest.approx(1e-4 + 0.5 * (1 + math.cos(math.pi / 4)) * 9e-4)
    assert get_lr(110, **SCHEDULE) == 1e-4
    assert get_lr(10_000, **SCHEDULE) == 1e-4
    lrs = [get_lr(s, **SCHEDULE) for s in range(10, 111)]
    assert all(b <= a for a, b in zip(lrs, lrs[1:]))  # decays monotonically


def test_linear_schedule_decays_in_equal_steps():
    lrs = [get_lr(s, **SCHEDULE, schedule="linear") for s in range(10, 111)]
    assert lrs[0] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-4)
    assert get_lr(35, **SCHEDULE, schedule="linear") == pytest.approx(1e-4 + 0.75 * 9e-4)  # cosine would be 0.854
    assert all(b - a == pytest.approx(-9e-6) for a, b in zip(lrs, lrs[1:]))


def test_no_warmup_starts_at_peak():
    assert get_lr(0, lr=1.0, min_lr=0.0, warmup_steps=0, decay_steps=10) == 1.0


# ---- optimizer


def test_weight_decay_on_matrices_only_and_tied_embedding_once(tiny_model):
    params = list(tiny_model.parameters())
    assert tiny_model.get_input_embeddings().weight is tiny_model.get_output_embeddings().weight  # tied, as Qwen2.5
    opt = make_optimizer(
        params, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, eps=1e-8, kind="adamw", device=torch.device("cpu")
    )
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert decay["params"] and all(p.dim() >= 2 for p in decay["params"])
    assert no_decay["params"] and all(p.dim() == 1 for p in no_decay["params"])
    norms = [m.weight for name, m in tiny_model.named_modules() if name.endswith("norm")]
    biases = [m.bias for m in tiny_model.modules() if isinstance(m, torch.nn.Linear) and m.bias is not None]
    assert norms and biases
    assert {id(p) for p in norms + biases} <= {id(p) for p in no_decay["params"]}
    grouped = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(grouped) == len(set(grouped)) == len({id(p) for p in params})
    assert grouped.count(id(tiny_model.get_input_embeddings().weight)) == 1


def test_frozen_parameters_are_left_out():
    model = AutoModelForCausalLM.from_config(tiny.model_config())
    model.get_input_embeddings().weight.requires_grad_(False)
    opt = make_optimizer(
        list(model.parameters()),
        lr=1e-3,
        betas=(0.9, 0.95),
        weight_decay=0.1,
        eps=1e-8,
        kind="adamw",
        device=torch.device("cpu"),
    )
    grouped = {id(p) for g in opt.param_groups for p in g["params"]}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert grouped == trainable and trainable  # every trainable parameter, and nothing frozen
    assert id(model.get_input_embeddings().weight) not in grouped


def test_adamw8bit_on_cpu_is_an_input_error(tiny_model):
    with pytest.raises(InputError, match="adamw8bit needs a CUDA device"):
        make_optimizer(
            list(tiny_model.parameters()),
            lr=1e-3,
            betas=(0.9, 0.95),
            weight_decay=0.1,
            eps=1e-8,
            kind="adamw8bit",
            device=torch.device("cpu"),
        )


# ---- batches


def test_every_stage_runtime_turns_cudnn_attention_off():
    """cuDNN's SDPA gave NaN gradients in the reward model's shared-prefix step on an H200 and
    re-plans for every sequence length (bench/gpu_results): every entry point's setup_runtime
    switches it off, the other SDPA kernels stay on."""
    torch.backends.cuda.enable_cudnn_sdp(True)
    setup_runtime("cpu", "fp32")
    assert not torch.backends.cuda.cudnn_sdp_enabled()
    assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()


def test_micro_batch_layout():
    assert micro_batch_layout(128, 16) == 8
    assert micro_batch_layout(128, 16, world_size=2) == 4
    assert micro_batch_layout(16, 16) == 1
    with pytest.raises(InputError, match="--batch-size 10 is not divisible by --micro-batch-size 4"):
        micro_batch_layout(10, 4)
    with pytest.raises(InputError, match="--batch-size 16 .* --micro-batch-size 4 x 3 process"):
        micro_batch_layout(16, 4, world_size=3)
    with pytest.raises(InputError, match="--batch-size 16 .* --micro-batch-size 16 x 2 process"):
        micro_batch_layout(16, 16, world_size=2)


def test_batch_indices_are_a_pure_function_of_step_and_seed():
    assert batch_indices(7, 100, 8, seed=3) == batch_indices(7, 100, 8, seed=3)
    assert batch_indices(7, 100, 8, seed=3) != batch_indices(7, 100, 8, seed=4)


def test_each_epoch_visits_rows_at_most_once_in_a_fresh_order():
    n_rows, batch_size = 50, 8  # 6 steps per epoch, 2 rows left over each epoch
    per_epoch = n_rows // batch_size
    epochs = []
    for epoch in range(3):
        rows = [
            i
            for s in range(epoch * per_epoch, (epoch + 1) * per_epoch)
            for i in batch_indices(s, n_rows, batch_size, seed=1)
        ]
        assert len(rows) == len(set(rows)) == per_epoch * batch_size
        assert all(0 <= i < n_rows for i in rows)
        epochs.append(rows)
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
    with pytest.raises(InputError, match="fewer than one batch"):
        batch_indices(0, 5, 8, seed=1)


def test_micro_batches_cover_the_batch_once_longest_first():
    indices = [40, 3, 17, 8, 25, 11, 2, 30, 19]
    lengths = [5, 90, 12, 33, 7, 61, 48, 20, 15]
    micros = list(micro_batches(indices, lengths, micro_batch_size=4))
    assert [len(m) for m in micros] == [4, 4, 1]
    flat = [i for m in micros for i in m]
    assert sorted(flat) == sorted(indices)
    length_of = dict(zip(indices, lengths))
    assert [length_of[i] for i in flat] == sorted(lengths, reverse=True)


@pytest.mark.parametrize("world_size", [2, 3])
def test_rank_shares_are_disjoint_and_cover_the_batch(world_size):
    indices = list(range(100, 112))
    lengths = [(7 * i) % 13 + 1 for i in range(12)]
    shares = [
        [i for m in micro_batches(indices, lengths, 2, rank=r, world_size=world_size) for i in m]
        for r in range(world_size)
    ]
    flat = [i for s in shares for i in s]
    assert len(flat) == len(set(flat)) == len(indices) and set(flat) == set(indices)
    assert all(len(s) == len(indices) // world_size for s in shares)


# ---- checkpoints


def save(out, step, model, tokenizer, metric=None, config=None):
    return save_checkpoint(
        out, step, {"model": model}, tokenizer, {"note": f"state {step}"}, config or {"lr": 1e-3}, metric=metric
    )


def step_names(out):
    return sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_"))


def test_keeps_only_the_last_and_the_best_checkpoint(tmp_path, tiny_model, tokenizer):
    save(tmp_path, 10, tiny_model, tokenizer, metric=2.0)
    save(tmp_path, 20, tiny_model, tokenizer, metric=1.0)
    save(tmp_path, 30, tiny_model, tokenizer, metric=1.5)
    assert step_names(tmp_path) == ["step_000020", "step_000030"]
    assert json.loads((tmp_path / "checkpoints" / "best.json").read_text()) == {"step": 20, "metric": 1.0}
    assert latest_checkpoint(tmp_path).name == "step_000030"
    save(tmp_path, 40, tiny_model, tokenizer, metric=0.5)  # new best is also the last
    assert step_names(tmp_path) == ["step_000040"]
    assert json.loads((tmp_path / "checkpoints" / "best.json").read_text()) == {"step": 40, "metric": 0.5}
    step_dir = latest_checkpoint(tmp_path)
    assert load_state(step_dir) == {"note": "state 40", "step": 40}
    reloaded = AutoModelForCausalLM.from_pretrained(str(step_dir))
    assert all(torch.equal(a, b) for a, b in zip(tiny_model.state_dict().values(), reloaded.state_dict().values()))


def test_higher_is_better_metric(tmp_path, tiny_model, tokenizer):
    for step, metric in [(1, 0.6), (2, 0.8), (3, 0.7)]:
        save_checkpoint(tmp_path, step, {"model": tiny_model}, tokenizer, {}, {}, metric=metric, higher_is_better=True)
    assert step_names(tmp_path) == ["step_000002", "step_000003"]


def test_leftover_tmp_dir_of_a_killed_save_is_ignored_then_cleaned(tmp_path, tiny_model, tokenizer):
    save(tmp_path, 10, tiny_model, tokenizer, metric=1.0)
    leftover = tmp_path / "checkpoints" / ".tmp-step_000020-99999"  # a save killed before its rename
    leftover.mkdir()
    torch.save({"step": 20}, leftover / STATE_FILE)
    (leftover / "model.safetensors").write_bytes(b"half a file")
    assert latest_checkpoint(tmp_path).name == "step_000010"
    save(tmp_path, 20, tiny_model, tokenizer, metric=2.0)
    assert not leftover.exists()
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    assert step_names(tmp_path) == ["step_000010", "step_000020"]
    assert latest_checkpoint(tmp_path).name == "step_000020"


def test_no_checkpoint_yet():
    assert latest_checkpoint("/nonexistent/out") is None


def test_resume_config_check_names_the_changed_field():
    saved = {"lr": 3e-6, "seed": 42, "batch_size": 128, "output_dir": "out/a", "max_steps": None}
    check_resume_config(saved, dict(saved), allow=False)
    with pytest.raises(InputError, match=r"resume with a changed config \(lr: 3e-06 -> 1e-05\).*--allow-config-change"):
        check_resume_config(saved, {**saved, "lr": 1e-5}, allow=False)
    with pytest.raises(InputError, match=r"batch_size: 128 -> 64, seed: 42 -> 1"):
        check_resume_config(saved, {**saved, "seed": 1, "batch_size": 64}, allow=False)
    with pytest.raises(InputError, match=r"new_field: None -> 1"):  # a field the saved run did not have
        check_resume_config(saved, {**saved, "new_field": 1}, allow=False)
    check_resume_config(saved, {**saved, "lr": 1e-5}, allow=True)


def test_resume_safe_fields_may_change():
    saved = {"lr": 3e-6, **{k: "saved" for k in RESUME_SAFE_FIELDS}}
    check_resume_config(saved, {"lr": 3e-6, **{k: "changed" for k in RESUME_SAFE_FIELDS}}, allow=False)
    assert {"resume", "output_dir", "max_steps", "eval_interval"} <= RESUME_SAFE_FIELDS
    assert not {"lr", "seed", "batch_size", "micro_batch_size"} & RESUME_SAFE_FIELDS


def test_resume_safe_fields_are_stage_config_fields():
    """A stale name (wandb_run_name, log_interval: no Config had them) exempts nothing and hides
    the field it was meant to be; a cadence left out (sample_interval) refuses a harmless resume."""
    stages = sorted(p.stem for p in REPO.glob("*.py"))  # sft, reward, ppo, dpo, grpo: every stage script
    fields = {f.name for stage in stages for f in dataclasses.fields(load_script(stage).Config)}
    assert {"sft", "reward", "ppo"} <= set(stages)
    assert RESUME_SAFE_FIELDS <= fields, f"not a field of any stage Config: {sorted(RESUME_SAFE_FIELDS - fields)}"
    intervals = {f for f in fields if f.endswith("_interval")}
    assert intervals <= RESUME_SAFE_FIELDS, (
        f"cadences missing from RESUME_SAFE_FIELDS: {sorted(intervals - RESUME_SAFE_FIELDS)}"
    )


def test_resume_point_accepts_the_config_it_saved(tmp_path, tiny_model, tokenizer):
    """A stage's config (dataclasses.asdict) holds tuples, e.g. betas; the saved JSON holds lists."""
    config = {"lr": 1e-3, "betas": (0.9, 0.95), "output_dir": str(tmp_path), "resume": False}
    save_checkpoint(tmp_path, 5, {"model": tiny_model}, tokenizer, {"note": "x"}, config)
    step_dir, state = resume_point(tmp_path, {**config, "resume": True}, allow_config_change=False)
    assert step_dir.name == "step_000005" and state == {"note": "x", "step": 5}
    with pytest.raises(InputError, match=r"\(lr: 0.001 -> 0.002\)"):
        resume_point(tmp_path, {**config, "lr": 2e-3}, allow_config_change=False)
    assert resume_point(tmp_path / "fresh", config, allow_config_change=False) is None


@pytest.mark.parametrize("content", [b"", b"not a torch file", b"PK\x03\x04 truncated zip"])
def test_corrupted_state_is_a_one_line_input_error(tmp_path, content):
    (tmp_path / STATE_FILE).write_bytes(content)
    with pytest.raises(InputError) as e:
        load_state(tmp_path)
    message = str(e.value)
    assert "\n" not in message and str(tmp_path / STATE_FILE) in message and "cannot be read" in message


# ---- logger


def test_logger_writes_one_record_per_call_with_its_step(tmp_path):
    logger = Logger(tmp_path, {"lr": 1e-3})
    logger.log({"train/loss": torch.tensor(2.5), "lr": 1e-3}, 0)
    logger.log({"val/loss": 1.25}, 1)
    logger.finish()
    assert read_metrics(tmp_path / "metrics.jsonl") == [
        {"step": 0, "train/loss": 2.5, "lr": 1e-3},
        {"step": 1, "val/loss": 1.25},
    ]


def test_logger_on_resume_drops_records_from_the_resumed_step_on(tmp_path):
    logger = Logger(tmp_path, {})
    for step in range(6):
        logger.log({"train/loss": float(step)}, step)
    logger = Logger(tmp_path, {}, resume_step=3)  # the resumed run redoes step 3 and logs it again
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [0, 1, 2]
    logger.log({"train/loss": 9.0}, 3)
    assert read_metrics(tmp_path / "metrics.jsonl")[-1] == {"step": 3, "train/loss": 9.0}
    Logger(tmp_path, {})  # a fresh run starts a fresh file
    assert read_metrics(tmp_path / "metrics.jsonl") == []


def test_disabled_logger_writes_nothing(tmp_path):
    logger = Logger(tmp_path / "out", {}, enabled=False)
    logger.log({"train/loss": 1.0}, 0)
    logger.finish()
    assert not (tmp_path / "out").exists()
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n')
    Logger(tmp_path, {}, resume_step=None, enabled=False).log({"x": 1.0}, 1)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 0}\n'  # a non-main rank leaves rank 0's file alone
