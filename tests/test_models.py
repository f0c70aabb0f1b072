"""Forwards every stage shares: the response-only LM loss, positions under padding, SFT batches."""

import copy
import importlib.util
import sys

import datasets
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from dgx_spark_summary_from_human_feedback import tiny
from dgx_spark_summary_from_human_feedback.data import load_raw
from dgx_spark_summary_from_human_feedback.models import PACKED_SDPA, hidden_states, lm_loss_sum, load_policy
from dgx_spark_summary_from_human_feedback.preprocess import process_sft
from dgx_spark_summary_from_human_feedback.training import make_optimizer, micro_batches

from .conftest import REPO

COLUMNS = [
    "query_reference_response_token",
    "query_reference_response_token_len",
    "reference_response_token_len",
    "query_token_len",
]


def load_sft_script():
    """sft.py is a script at the repo root, not part of the package: import it by path."""
    if "sft" in sys.modules:
        return sys.modules["sft"]
    spec = importlib.util.spec_from_file_location("sft", REPO / "sft.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["sft"] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


sft = load_sft_script()


@pytest.fixture(scope="module")
def model(tiny_model_dir, tokenizer):
    return load_policy(str(tiny_model_dir), tokenizer).eval()


@pytest.fixture(scope="module")
def sft_rows(tokenizer):
    """12 processed fixture rows: the long edge cases (queries cut to 512, a 63-token response) and short ones."""
    raw = load_raw(str(tiny.SFT_DIR))
    raw = datasets.DatasetDict({"train": raw["train"].select(range(12))})
    return process_sft(raw, tokenizer, long_response="truncate")["train"].with_format("torch", columns=COLUMNS)


def reference_loss(model, input_ids, labels):
    """The textbook loss: full logits of a plain forward, shift by one, CE over labels != -100."""
    logits = model(input_ids).logits[:, :-1].float()
    targets = labels[:, 1:]
    keep = targets != -100
    return F.cross_entropy(logits[keep], targets[keep], reduction="sum"), int(keep.sum())


def random_batch(tokenizer, B=3, T=14, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, len(tokenizer) - 1, (B, T), generator=g)  # no EOS (0) and no [PAD] (788)
    labels = ids.clone()
    labels[:, :6] = -100  # the "query"
    labels[1, 10:] = -100
    return ids, labels


# ---- response-only LM loss


def test_lm_loss_sum_equals_the_full_logits_loss(model, tokenizer):
    ids, labels = random_batch(tokenizer)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        loss, n = lm_loss_sum(model, ids, mask, labels)
        expected, expected_n = reference_loss(model, ids, labels)
    assert n == expected_n == 3 * 13 - 3 * 5 - 4
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)


def test_extra_right_padding_does_not_change_the_loss(model, tokenizer):
    ids, labels = random_batch(tokenizer)
    lengths = torch.tensor([14, 10, 12])
    mask = (torch.arange(14)[None, :] < lengths[:, None]).long()
    ids = ids.masked_fill(mask == 0, tokenizer.pad_token_id)
    labels = labels.masked_fill(mask == 0, -100)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    pad = 7
    ids_p = torch.cat([ids, torch.full((3, pad), tokenizer.pad_token_id)], dim=1)
    mask_p = torch.cat([mask, torch.zeros(3, pad, dtype=mask.dtype)], dim=1)
    labels_p = torch.cat([labels, torch.full((3, pad), -100)], dim=1)
    with torch.no_grad():
        loss, n = lm_loss_sum(model, ids, mask, labels)
        loss_p, n_p = lm_loss_sum(model, ids_p, mask_p, labels_p)
    assert n == n_p
    torch.testing.assert_close(loss_p, loss, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pack", [True, False])  # packed: the CPU default; padded: what CUDA runs
def test_left_padding_gives_the_same_hidden_states_as_no_padding(model, tokenizer, pack):
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(1, 700, (n,), generator=g) for n in (9, 4, 6)]
    T = max(len(r) for r in rows)
    ids = torch.stack([torch.cat([torch.full((T - len(r),), tokenizer.pad_token_id), r]) for r in rows])
    mask = torch.stack([torch.cat([torch.zeros(T - len(r)), torch.ones(len(r))]) for r in rows]).long()
    with torch.no_grad():
        batched = hidden_states(model, ids, mask, pack=pack)
        for i, r in enumerate(rows):
            alone = hidden_states(model, r[None], torch.ones(1, len(r), dtype=torch.long), pack=pack)[0]
            torch.testing.assert_close(batched[i, T - len(r) :], alone, rtol=1e-5, atol=1e-5)


def padded_rows(tokenizer, seed=2):
    """Rows left padded (queries), right padded (after an EOS) and both, in one batch."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 700, (4, 13), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding
    mask[1, 9:] = 0  # right padding
    mask[2, :3] = 0  # both
    mask[2, 11:] = 0
    return ids.masked_fill(mask == 0, tokenizer.pad_token_id), mask


def test_packed_forward_matches_the_padded_forward_and_its_gradients(model, tokenizer):
    ids, mask = padded_rows(tokenizer)
    keep = mask.bool()
    results = {}
    for pack in (False, True):
        model.zero_grad()
        hidden = hidden_states(model, ids, mask, pack=pack)
        (hidden[keep] ** 2).sum().backward()
        results[pack] = hidden.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
    (padded, padded_grads), (packed, packed_grads) = results[False], results[True]
    model.zero_grad()
    torch.testing.assert_close(packed[keep], padded[keep], rtol=1e-5, atol=1e-5)
    assert (packed[~keep] == 0).all()  # padding is not computed
    for name, grad in padded_grads.items():  # fp32 sums in another order: 1e-4 of each gradient's scale
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-4 * float(grad.abs().max()), msg=name)


def test_packed_forward_under_gradient_checkpointing(model, tokenizer):
    """The segments reach the attention through checkpointed layers too (`--gradient-checkpointing`)."""
    ids, mask = padded_rows(tokenizer)
    keep = mask.bool()
    checkpointed = copy.deepcopy(model).train()
    checkpointed.gradient_checkpointing_enable()
    grads = []
    for m in (model, checkpointed):
        m.zero_grad()
        (hidden_states(m, ids, mask, pack=True)[keep] ** 2).sum().backward()
        grads.append(m.model.layers[0].self_attn.q_proj.weight.grad.clone())
    model.zero_grad()
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-5)


def test_packed_rows_do_not_attend_to_each_other(model, tokenizer):
    ids, mask = padded_rows(tokenizer)
    changed = ids.clone()
    changed[0, 5:] = torch.randint(1, 700, (8,), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        before, after = hidden_states(model, ids, mask, pack=True), hidden_states(model, changed, mask, pack=True)
    assert not torch.allclose(before[0], after[0])
    torch.testing.assert_close(after[1:], before[1:], rtol=0, atol=0)  # the rows packed after row 0


def test_transformers_own_sdpa_reads_packed_rows_the_same(model, tokenizer, tiny_model_dir, tmp_path):
    """Our loaders use `sdpa_packed`; a model loaded with plain "sdpa" gets the same packed result
    (transformers masks packed rows from the restarting position ids), and the checkpoint keeps
    no trace of our attention name."""
    assert model.config._attn_implementation == PACKED_SDPA
    model.save_pretrained(str(tmp_path))
    assert PACKED_SDPA not in (tmp_path / "config.json").read_text()
    plain = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), attn_implementation="sdpa").eval()
    ids, mask = padded_rows(tokenizer)
    keep = mask.bool()
    with torch.no_grad():
        ours, theirs = hidden_states(model, ids, mask, pack=True), hidden_states(plain, ids, mask, pack=True)
    torch.testing.assert_close(ours[keep], theirs[keep], rtol=1e-5, atol=1e-5)


# ---- SFT batches and gradient accumulation


def test_sft_batch_labels_only_the_response_and_keep_its_eos(sft_rows, tokenizer):
    rows = sft_rows[:6]
    ids, mask, labels = sft.sft_batch(rows, train_on_query=False, device="cpu")
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    assert pad != eos
    lengths, r_lengths, q_lengths = (
        rows["query_reference_response_token_len"],
        rows["reference_response_token_len"],
        rows["query_token_len"],
    )
    assert ids.shape[1] == int(lengths.max())  # trimmed to the longest row
    for i in range(6):
        L, q = int(lengths[i]), int(q_lengths[i])
        assert L - int(r_lengths[i]) == q
        assert mask[i, :L].all() and not mask[i, L:].any()
        assert (labels[i, :q] == -100).all()
        assert torch.equal(labels[i, q:L], ids[i, q:L])
        assert labels[i, L - 1] == eos and ids[i, L - 1] == eos
        assert (labels[i, L:] == -100).all() and (ids[i, L:] == pad).all()
        assert (ids[i, :L] != pad).all()
    _, _, labels_q = sft.sft_batch(rows, train_on_query=True, device="cpu")
    for i in range(6):
        L = int(lengths[i])
        assert torch.equal(labels_q[i, :L], ids[i, :L]) and (labels_q[i, L:] == -100).all()


def accumulate(model, rows, micro_batch_size):
    """sft.py's micro-steps: each micro-batch's summed loss over the whole batch's label count."""
    indices = list(range(len(rows)))
    lengths = rows["query_reference_response_token_len"][:].tolist()
    n_labels = int(rows["reference_response_token_len"][:].sum())
    counted = 0
    for micro in micro_batches(indices, lengths, micro_batch_size):
        ids, mask, labels = sft.sft_batch(rows[micro], False, "cpu")
        loss_sum, n = lm_loss_sum(model, ids, mask, labels)
        (loss_sum / n_labels).backward()
        counted += n
    assert counted == n_labels  # every response token (EOS included) is labelled exactly once


def test_gradient_accumulation_matches_one_big_batch(model, sft_rows):
    rows = sft_rows.select(range(8))
    assert len(set(rows["query_reference_response_token_len"][:].tolist())) > 2  # micro-batches pad differently
    one, two = copy.deepcopy(model).train(), copy.deepcopy(model).train()
    accumulate(one, rows, micro_batch_size=8)
    accumulate(two, rows, micro_batch_size=4)
    for (name, p1), p2 in zip(one.named_parameters(), two.parameters()):
        assert (p1.grad - p2.grad).norm() <= 1e-6 * p1.grad.norm() + 1e-12, name
    optimizers = [
        make_optimizer(
            list(m.parameters()),
            lr=1e-3,
            betas=(0.9, 0.95),
            weight_decay=0.1,
            eps=1e-8,
            kind="adamw",
            device=torch.device("cpu"),
        )
        for m in (one, two)
    ]
    for m, opt in zip((one, two), optimizers):
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
    moved = max((p1 - p0).abs().max().item() for p1, p0 in zip(one.parameters(), model.parameters()))
    assert moved > 5e-4  # the step did something (lr 1e-3: Adam moves each weight by about lr)
    # Adam divides by |grad|: an element whose gradient is near eps (1e-8) turns fp32 rounding of
    # its gradient into up to ~1% of lr, hence 1e-5 rather than 1e-6 on the weights
    for p1, p2 in zip(one.parameters(), two.parameters()):
        torch.testing.assert_close(p1, p2, rtol=0, atol=1e-5)


def test_per_micro_batch_mean_would_not_match(model, sft_rows):
    """Why the loss is divided by the batch's label count: a per-micro-batch mean changes the gradient."""
    rows = sft_rows.select(range(8))
    grads = []
    for size in (8, 4):
        m = copy.deepcopy(model).train()
        for micro in micro_batches(list(range(8)), rows["query_reference_response_token_len"][:].tolist(), size):
            ids, mask, labels = sft.sft_batch(rows[micro], False, "cpu")
            loss_sum, n = lm_loss_sum(m, ids, mask, labels)
            (loss_sum / n / (8 // size)).backward()
        grads.append(m.get_input_embeddings().weight.grad)
    assert (grads[0] - grads[1]).norm() > 1e-4 * grads[0].norm()
