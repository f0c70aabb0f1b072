"""Issue 17's GPU paths, checked where the CPU runs them: one-call packed attention (flex on CPU,
forward only) against the padded forward. Static decoding is in test_generation.py; the GPU
checks (varlen, flex gradients, CUDA-graph decoding, speed) are bench/gpu_issue17.py."""

import pytest
import torch

from dgx_spark_summary_from_human_feedback.generation import InputError
from dgx_spark_summary_from_human_feedback.models import (
    PACKED_FLEX,
    PACKED_VARLEN,
    get_score,
    hidden_states,
    load_policy,
    load_reward_model,
)

from .test_models import padded_rows


@pytest.fixture(scope="module")
def flex_model(tiny_model_dir, tokenizer):
    return load_policy(str(tiny_model_dir), tokenizer, attention=PACKED_FLEX).eval()


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_packed_forward_matches_the_padded_forward(flex_model, tokenizer):
    ids, mask = padded_rows(tokenizer)  # left, right and both-sides padding in one batch
    keep = mask.bool()
    with torch.no_grad():
        packed, padded = hidden_states(flex_model, ids, mask), hidden_states(flex_model, ids, mask, pack=False)
    torch.testing.assert_close(packed[keep], padded[keep], rtol=1e-5, atol=1e-5)
    assert (packed[~keep] == 0).all()


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_packed_rows_do_not_attend_to_each_other(flex_model, tokenizer):
    ids, mask = padded_rows(tokenizer)
    changed = ids.clone()
    changed[0, 5:] = torch.randint(1, 700, (8,), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        before, after = hidden_states(flex_model, ids, mask), hidden_states(flex_model, changed, mask)
    assert not torch.allclose(before[0], after[0])
    torch.testing.assert_close(after[1:], before[1:], rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_reward_model_scores_as_the_default_one(tiny_model_dir, tokenizer):
    ids, mask = padded_rows(tokenizer)
    mask[:, -1] = torch.tensor(
        [1, 0, 0, 1]
    )  # rows end at different columns: the score is read at each row's last token
    scores = {}
    for attention in ("sdpa_packed", PACKED_FLEX):
        torch.manual_seed(0)  # the same fresh head
        model = load_reward_model(str(tiny_model_dir), tokenizer, new_head=True, attention=attention).eval()
        with torch.no_grad():
            scores[attention] = get_score(model, ids, mask)
    torch.testing.assert_close(scores[PACKED_FLEX], scores["sdpa_packed"], rtol=1e-5, atol=1e-5)


def test_one_call_packed_attention_off_its_device_is_a_one_line_error(tiny_model_dir, flex_model, tokenizer):
    ids, mask = padded_rows(tokenizer)
    with pytest.raises(InputError, match="flex_packed attention has no backward on CPU"):
        hidden_states(flex_model, ids, mask)  # grad enabled: a training forward
    varlen = load_policy(str(tiny_model_dir), tokenizer, attention=PACKED_VARLEN).eval()
    with pytest.raises(InputError, match="varlen_packed attention runs on CUDA in bf16/fp16 only"):
        hidden_states(varlen, ids, mask)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_packed_attention_leaves_generation_on_sdpa(flex_model, tiny_model_dir, tokenizer):
    """Outside packed forwards the one-call attentions are transformers' SDPA: same samples."""
    from dgx_spark_summary_from_human_feedback.generation import generate, pad_queries

    default = load_policy(str(tiny_model_dir), tokenizer).eval()
    ids, mask = pad_queries([[5, 6, 7], list(range(40, 51))], tokenizer.pad_token_id, "cpu")
    samples = [
        generate(m, ids, mask, max_new_tokens=8, temperature=1.0, generator=torch.Generator().manual_seed(0))
        for m in (default, flex_model)
    ]
    assert torch.equal(samples[0], samples[1])


def test_rollout_with_static_decoding_is_the_eager_rollout(tiny_model_dir, tokenizer):
    """PPO's (and GRPO's) rollout threads `decoding` to generate: same responses, log-probs, scores."""
    from dgx_spark_summary_from_human_feedback.generation import pad_queries
    from dgx_spark_summary_from_human_feedback.rollout import rollout

    from .stage_fixtures import eos_prone

    policy = eos_prone(load_policy(str(tiny_model_dir), tokenizer), tokenizer.eos_token_id, boost=0.3)
    ref_policy = load_policy(str(tiny_model_dir), tokenizer).eval()
    ids, mask = pad_queries(
        [[5, 6, 7], list(range(40, 51)), list(range(100, 107)), [9] * 5], tokenizer.pad_token_id, "cpu"
    )

    def score_fn(query_responses, attention_mask):
        return attention_mask.sum(-1).float()  # any function of the sampled rows

    batches = {}
    for decoding in ("eager", "static"):
        batches[decoding] = rollout(
            policy,
            ref_policy,
            score_fn,
            ids,
            mask,
            tokenizer,
            response_length=16,
            temperature=0.7,
            no_eos_score=-1.0,
            generation_batch_size=3,
            forward_batch_size=2,
            generator=torch.Generator().manual_seed(0),
            decoding=decoding,
        )
    eager, static = batches["eager"], batches["static"]
    assert eager.has_eos.any()  # EOS mid-way: truncation, padding and the no-EOS score are exercised too
    for name in ("query_responses", "attention_mask", "responses", "has_eos", "logprobs", "ref_logprobs", "scores"):
        assert torch.equal(getattr(static, name), getattr(eager, name)), name
    with pytest.raises(InputError, match="cuda_graph needs a CUDA device"):  # the option does reach generate
        rollout(
            policy,
            ref_policy,
            score_fn,
            ids,
            mask,
            tokenizer,
            response_length=4,
            temperature=0.7,
            no_eos_score=-1.0,
            generation_batch_size=3,
            forward_batch_size=2,
            decoding="cuda_graph",
        )


@pytest.mark.slow
def test_gpu_script_runs_every_code_path_on_cpu(tmp_path):
    """bench/gpu_issue17.py cannot run here on a GPU; its --cpu-smoke keeps it from rotting."""
    import json
    import subprocess
    import sys

    from .conftest import REPO

    out = tmp_path / "gpu_issue17.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_issue17.py"), "--cpu-smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["errors"] == {}, data["errors"]
    results = data["measurements"]
    for row in results["decode"].values():
        assert row["static"]["same_tokens_as_eager"] == 1.0 and row["static"]["first_step_logits_gap"] < 1e-5
    packed = results["packed"]
    assert packed["sdpa_packed"]["hidden_gap"] < 1e-5 and packed["sdpa_packed"]["grad_gap_max"] < 1e-3
    assert packed["flex_packed"]["hidden_gap"] < 1e-5 and "no backward on CPU" in packed["flex_packed"]["error"]
    assert "runs on CUDA" in packed["varlen_packed"]["error"]
    assert all(
        isinstance(v, dict) and v["ms"] > 0 for part in ("reward_sweep", "ppo_sweep") for v in results[part].values()
    )


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_packed_under_bf16_autocast(flex_model, tokenizer):
    """As the stages run on a GPU: under autocast q and k reach the attention in fp32, v in bf16."""
    ids, mask = padded_rows(tokenizer)
    keep = mask.bool()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        packed, padded = hidden_states(flex_model, ids, mask), hidden_states(flex_model, ids, mask, pack=False)
    assert packed.dtype == padded.dtype
    torch.testing.assert_close(
        packed[keep].float(), padded[keep].float(), rtol=0.02, atol=0.02 * float(padded.abs().max())
    )
