"""Sampling: EOS truncation, the KV-cache loop against a plain forward, top-k/top-p, the CLI."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from dgx_spark_summary_from_human_feedback import tiny
from dgx_spark_summary_from_human_feedback.generation import (
    generate,
    pad_queries,
    query_tokens_of,
    sample_next,
    truncate_after_eos,
)
from dgx_spark_summary_from_human_feedback.models import load_policy

from .stage_fixtures import eos_prone

PKG = "dgx_spark_summary_from_human_feedback"
QUERIES = [
    list(range(5, 8)),
    list(range(40, 51)),
    list(range(100, 107)),
]  # lengths 3, 11, 7: left padding differs per row


@pytest.fixture(scope="module")
def model(tiny_model_dir, tokenizer):
    return load_policy(str(tiny_model_dir), tokenizer).eval()


# ---- EOS truncation


def test_truncate_after_eos_pads_after_the_first_eos_and_keeps_it(tokenizer):
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    responses = torch.tensor([[5, eos, 7, eos], [5, 6, 7, 8], [eos, 3, 3, 3], [9, 9, 9, eos]])
    out, keep, has_eos = truncate_after_eos(responses, eos, pad)
    assert out.tolist() == [[5, eos, pad, pad], [5, 6, 7, 8], [eos, pad, pad, pad], [9, 9, 9, eos]]
    assert keep.tolist() == [[True, True, False, False], [True] * 4, [True, False, False, False], [True] * 4]
    assert has_eos.tolist() == [True, False, True, True]
    assert torch.equal(responses[0], torch.tensor([5, eos, 7, eos]))  # the input is left alone


# ---- the sampling loop


def greedy_without_cache(model, query: list[int], steps: int) -> list[int]:
    """Reference: argmax of a plain full forward over the unpadded sequence, one token at a time."""
    seq = list(query)
    with torch.no_grad():
        for _ in range(steps):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(query) :]


@pytest.fixture(scope="module")
def position_sensitive_model():
    """A tiny Qwen2 whose greedy continuation depends on positions.

    At init the tied model just repeats its last token and its attention is near uniform, so a
    wrong position would go unnoticed: untie the head and sharpen attention (q and k x 4). With
    these, prefilling left-padded rows at positions counted from the first column flips the
    argmax in most steps.
    """
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        tiny.model_config(tie_word_embeddings=False), attn_implementation="sdpa"
    ).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight *= 4
            layer.self_attn.k_proj.weight *= 4
    return model


def test_greedy_generation_under_left_padding_matches_plain_forwards(position_sensitive_model, tokenizer):
    model = position_sensitive_model
    ids, mask = pad_queries(QUERIES, tokenizer.pad_token_id, "cpu")
    assert (mask == 0).any(-1).tolist() == [True, False, True]
    responses = generate(model, ids, mask, max_new_tokens=12, temperature=0.0)
    assert responses.shape == (3, 12)
    for row, query in zip(responses.tolist(), QUERIES):
        expected = greedy_without_cache(model, query, 12)
        assert len(set(expected)) > 3  # a real continuation, not one token repeated
        assert row == expected


def test_sampling_is_deterministic_given_the_generator(model, tokenizer):
    ids, mask = pad_queries(QUERIES, tokenizer.pad_token_id, "cpu")

    def sample(seed):
        return generate(
            model, ids, mask, max_new_tokens=16, temperature=1.0, generator=torch.Generator().manual_seed(seed)
        )

    assert torch.equal(sample(7), sample(7))
    assert not torch.equal(sample(7), sample(8))


def test_without_eos_id_samples_every_position_past_eos(model, tokenizer):
    eos = tokenizer.eos_token_id
    likely = eos_prone(model, eos, boost=2.0)
    ids, mask = pad_queries(QUERIES, tokenizer.pad_token_id, "cpu")
    calls = []
    hook = likely.register_forward_hook(lambda *_: calls.append(1))
    try:
        responses = generate(
            likely, ids, mask, max_new_tokens=10, temperature=1.0, generator=torch.Generator().manual_seed(0)
        )
        assert responses.shape == (3, 10) and len(calls) == 10  # one prefill + 9 decode steps: no early stop
        assert (responses[:, 0] == eos).all()  # EOS came first in every row, and sampling went on
        calls.clear()
        stopped = generate(
            likely,
            ids,
            mask,
            max_new_tokens=10,
            temperature=1.0,
            generator=torch.Generator().manual_seed(0),
            eos_token_id=eos,
        )
        assert stopped.shape == (3, 10) and len(calls) < 10  # stopped once every row had its EOS
        assert (stopped[:, 0] == eos).all()
    finally:
        hook.remove()


def test_tokens_after_an_eos_are_still_sampled(model, tokenizer):
    """The N+ EOS trick: with eos_token_id None, rows keep sampling after EOS (then get truncated)."""
    eos = tokenizer.eos_token_id
    likely = eos_prone(model, eos, boost=0.5)
    ids, mask = pad_queries(QUERIES * 2, tokenizer.pad_token_id, "cpu")
    responses = generate(
        likely, ids, mask, max_new_tokens=40, temperature=1.0, generator=torch.Generator().manual_seed(0)
    )
    assert responses.shape == (6, 40)
    _, keep, has_eos = truncate_after_eos(responses, eos, tokenizer.pad_token_id)
    assert has_eos.any()
    after_eos = responses[has_eos][~keep[has_eos]]
    # real samples after the first EOS: many different tokens, not a constant filler (pad or EOS)
    assert len(after_eos) >= 20 and len(set(after_eos.tolist())) >= 10, after_eos.tolist()


# ---- next-token sampling


def test_top_k_1_and_tiny_top_p_are_greedy():
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(0))
    argmax = logits.argmax(-1)
    g = torch.Generator().manual_seed(1)
    assert torch.equal(sample_next(logits, 1.0, top_k=1, generator=g), argmax)
    assert torch.equal(sample_next(logits, 1.0, top_p=1e-6, generator=g), argmax)
    assert torch.equal(sample_next(logits, 0.0), argmax)
    assert not torch.equal(sample_next(logits, 1.0, generator=g), argmax)  # plain sampling is not


def test_top_k_and_top_p_keep_only_the_head():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().expand(4000, 4)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, 1.0, top_k=2, generator=g).tolist()) == {0, 1}
    assert set(sample_next(logits, 1.0, top_p=0.6, generator=g).tolist()) == {0, 1}  # 0.5 < 0.6 <= 0.8
    assert set(sample_next(logits, 1.0, top_p=0.9, generator=g).tolist()) == {0, 1, 2}
    assert set(sample_next(logits, 1.0, generator=g).tolist()) == {0, 1, 2, 3}


# ---- the CLI


@pytest.fixture(scope="module")
def eos_prone_dir(model, tokenizer, tmp_path_factory):
    """A checkpoint that ends most responses with EOS, so the CLI's truncation is exercised."""
    out = tmp_path_factory.mktemp("eos_prone")
    eos_prone(model, tokenizer.eos_token_id, boost=0.5).save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", f"{PKG}.generation", *args], capture_output=True, text=True, timeout=300
    )


def check_responses(records, tokenizer, max_new_tokens=63):
    eos = tokenizer.eos_token_id
    for r in records:
        tokens = r["response_token"]
        assert tokens.count(eos) <= 1 and tokenizer.pad_token_id not in tokens
        if r["has_eos"]:
            assert tokens[-1] == eos
        else:
            assert eos not in tokens and len(tokens) == max_new_tokens
        assert r["response"] == tokenizer.decode(tokens, skip_special_tokens=True)
    assert any(r["has_eos"] for r in records)


@pytest.mark.slow
def test_cli_samples_dataset_posts_and_truncates_after_eos(eos_prone_dir, tokenizer, tmp_path):
    out = tmp_path / "samples.jsonl"
    result = run_cli(
        "--checkpoint",
        str(eos_prone_dir),
        "--dataset",
        str(tiny.SFT_DIR),
        "--split",
        "validation",
        "--num-samples",
        "4",
        "--output",
        str(out),
        "--device",
        "cpu",
    )
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == ["validation-000", "validation-001", "validation-002", "validation-003"]
    validation = [json.loads(line) for line in (tiny.SFT_DIR / "validation.jsonl").read_text().splitlines()]
    assert [r["reference"] for r in records] == [v["summary"] for v in validation[:4]]
    assert all(r["query"].startswith("SUBREDDIT: r/") and r["query"].endswith("TL;DR:") for r in records)
    check_responses(records, tokenizer)
    assert "| id | query | response | has_eos |" in result.stdout


@pytest.mark.slow
def test_cli_prompt_file(eos_prone_dir, tokenizer, tmp_path):
    prompts = tmp_path / "posts.jsonl"
    prompts.write_text(
        json.dumps("My dog ate my car. What do I do?")
        + "\n"
        + json.dumps({"subreddit": "tifu", "title": "My cake", "post": "I broke it."})
        + "\n"
    )
    out = tmp_path / "samples.jsonl"
    result = run_cli(
        "--checkpoint", str(eos_prone_dir), "--prompt-file", str(prompts), "--output", str(out), "--device", "cpu"
    )
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == ["line1", "line2"]
    assert records[0]["query"] == "SUBREDDIT: r/\n\nTITLE: \n\nPOST: My dog ate my car. What do I do?\n\nTL;DR:"
    assert records[1]["query"] == "SUBREDDIT: r/tifu\n\nTITLE: My cake\n\nPOST: I broke it.\n\nTL;DR:"
    check_responses(records, tokenizer)


def test_cli_bad_prompt_file_is_one_line(eos_prone_dir, tmp_path):
    prompts = tmp_path / "posts.jsonl"
    prompts.write_text('"fine"\n{not json\n')
    result = run_cli("--checkpoint", str(eos_prone_dir), "--prompt-file", str(prompts), "--device", "cpu")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith(f"error: {prompts} line 2: not JSON")


# ---- static decoding (issue 17): the same tokens as the eager loop


@pytest.mark.parametrize(
    "sampling", [dict(temperature=1.0), dict(temperature=0.7, top_k=50, top_p=0.9), dict(temperature=0.0)]
)
def test_static_decoding_gives_the_same_tokens_as_eager(model, position_sensitive_model, tokenizer, sampling):
    """Left-padded rows, EOS mid-way (sampling goes on past it, or stops once every row has one):
    the preallocated cache, key mask and positions give what the growing ones give."""
    eos = tokenizer.eos_token_id
    likely = eos_prone(model, eos, boost=0.3)
    ids, mask = pad_queries(QUERIES * 2, tokenizer.pad_token_id, "cpu")
    for m, stop in ((position_sensitive_model, None), (likely, None), (likely, eos)):
        kwargs = dict(max_new_tokens=24, eos_token_id=stop, **sampling)
        eager = generate(m, ids, mask, generator=torch.Generator().manual_seed(5), **kwargs)
        static = generate(m, ids, mask, generator=torch.Generator().manual_seed(5), decoding="static", **kwargs)
        assert torch.equal(static, eager), (m is likely, stop)
        if m is likely and sampling["temperature"] > 0:
            first = (eager == eos).int().argmax(-1)
            assert ((eager == eos).any(-1) & (first > 0) & (first < 23)).any()  # an EOS mid-way, then more samples
        if m is position_sensitive_model and sampling["temperature"] == 0:
            assert len(set(eager[0].tolist())) > 3  # a real continuation, so positions and masks matter


def test_static_decoding_logits_match_eager_at_every_step(position_sensitive_model, tokenizer):
    """Closer than tokens: every step's logits (fed the same tokens) agree to float rounding."""
    ids, mask = pad_queries(QUERIES, tokenizer.pad_token_id, "cpu")
    logits = {}
    for decoding in ("eager", "static"):
        seen = []
        hook = position_sensitive_model.register_forward_hook(
            lambda _m, _a, out: seen.append(out.logits[:, -1].clone())
        )
        try:
            generate(position_sensitive_model, ids, mask, max_new_tokens=12, temperature=0.0, decoding=decoding)
        finally:
            hook.remove()
        logits[decoding] = torch.stack(seen)
    assert logits["static"].shape == (12, 3, logits["static"].shape[-1])
    torch.testing.assert_close(logits["static"], logits["eager"], rtol=1e-5, atol=1e-5)


def test_cuda_graph_decoding_off_cuda_is_a_one_line_error(model, tokenizer):
    from dgx_spark_summary_from_human_feedback.generation import InputError

    ids, mask = pad_queries(QUERIES, tokenizer.pad_token_id, "cpu")
    with pytest.raises(InputError, match="cuda_graph needs a CUDA device"):
        generate(model, ids, mask, max_new_tokens=4, temperature=1.0, decoding="cuda_graph")


def test_cli_decoding_static_writes_the_same_samples(eos_prone_dir, tmp_path):
    """The option reaches the CLI's sampling (and `summarize`, which SFT and evaluate.py share)."""
    from dgx_spark_summary_from_human_feedback.generation import Config, InputError, main

    records = {}
    for decoding in ("eager", "static"):
        records[decoding] = main(
            Config(
                checkpoint=str(eos_prone_dir),
                dataset=str(tiny.SFT_DIR),
                num_samples=6,
                batch_size=4,
                device="cpu",
                decoding=decoding,
            )
        )
    assert records["static"] == records["eager"]
    with pytest.raises(InputError, match="cuda_graph needs a CUDA device"):  # the option does reach generate
        main(
            Config(
                checkpoint=str(eos_prone_dir),
                dataset=str(tiny.SFT_DIR),
                num_samples=2,
                device="cpu",
                decoding="cuda_graph",
            )
        )
    assert any(r["has_eos"] for r in records["eager"]) and any(len(r["response_token"]) > 1 for r in records["eager"])


def test_query_tokens_without_a_length_column_are_what_follows_the_left_padding(tokenizer):
    """A processed row without `query_token_len`: the query starts after the leading padding, and
    a padding id inside it (a dataset whose pad id is also a real token, e.g. pad == EOS) stays."""
    pad = tokenizer.pad_token_id
    rows = [
        {"query_token": [pad, pad, 5, pad, 7]},
        {"query_token": [3, 4, 5]},
        {"query_token": [pad, 6], "query_token_len": 1},
    ]
    assert query_tokens_of(rows, tokenizer, query_length=512) == [[5, pad, 7], [3, 4, 5], [6]]
