"""Models every stage agrees on: loading, positions under padding, response log-probs, the score.

Two rules hold everywhere:
- Padding is found from attention masks and lengths, never from `ids == pad_id` (pad == EOS on
  Qwen2.5 would hide every EOS; N+ detail 4).
- Positions come from the attention mask, so a left-padded query and an unpadded one get the
  same logits (HF models count positions from the first column otherwise).
"""

from __future__ import annotations

import functools
import inspect
import itertools
import math
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
import transformers
from safetensors import safe_open
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
from transformers import (
    AttentionInterface,
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    PreTrainedModel,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .errors import InputError


def check_checkpoint(path: str, want: str) -> None:
    """One-line errors for a missing path or a checkpoint of the wrong kind (policy vs reward)."""
    p = Path(path).expanduser()
    if path.startswith((".", "/", "~")) and not p.exists():
        raise InputError(f"checkpoint {path} does not exist")
    if not p.exists():  # a Hub name: a typo must stop here, before minutes of data processing
        try:
            archs = AutoConfig.from_pretrained(path).architectures or []
        except (OSError, ValueError) as e:
            first = (str(e).splitlines() or [""])[0][:200]
            raise InputError(
                f"{path} is not a local checkpoint and not a model on the Hugging Face Hub ({first}): check the name; "
                "offline (HF_HUB_OFFLINE=1) it must be in the cache"
            ) from None
        if want == "reward" and not any(a.endswith("ForSequenceClassification") for a in archs):
            raise InputError(
                f"{path} holds {archs or 'no architecture'}, not a reward model: pass reward.py's output directory"
            )
        return
    if not (p / "config.json").exists():
        raise InputError(f"{path} is not a Hugging Face checkpoint (no config.json): pass the stage's output directory")
    archs = AutoConfig.from_pretrained(str(p)).architectures or []
    if want == "reward" and not any(a.endswith("ForSequenceClassification") for a in archs):
        raise InputError(
            f"{path} holds {archs or 'no architecture'}, not a reward model: pass reward.py's output directory"
        )
    if want == "policy" and any(a.endswith("ForSequenceClassification") for a in archs):
        raise InputError(
            f"{path} is a reward model ({archs[0]}), not a policy: pass sft.py's or ppo.py's output directory"
        )
    # a kill during an export leaves config.json without weights; a damaged disk, a cut file
    weights = sorted(p.glob("*.safetensors"))
    if not weights and any(p.glob("pytorch_model*.bin")):  # pickle: loading it can run code
        raise InputError(
            f"{path} holds only pickle weights (pytorch_model*.bin), and only safetensors are loaded: re-save it with "
            "save_pretrained(..., safe_serialization=True)"
        )
    if not weights:
        raise InputError(
            f"{path} has no model weights (model.safetensors): rerun the stage that wrote it (with --resume), or "
            "delete that checkpoint directory"
        )
    for file in weights:
        try:
            with safe_open(str(file), framework="pt"):  # reads the header, checks the file holds every tensor
                pass
        except Exception as e:  # noqa: BLE001 - SafetensorError or OSError: one line naming the file
            raise InputError(
                f"{file} is truncated or corrupted ({str(e).splitlines()[0]}): delete that checkpoint directory or "
                "rerun the stage that wrote it"
            ) from None


def fit_embeddings(model: PreTrainedModel, tokenizer) -> None:
    """Make room for [PAD] and record pad/EOS ids in the config.

    Qwen2.5 has 151,936 embedding rows for 151,665 tokens, so [PAD] (151665) fits as is. A model
    without spare rows grows by the missing rows (mean-initialised by transformers); a tokenizer
    whose ids exceed the model's vocabulary by more than the added specials is refused.
    """
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        added = len(tokenizer.get_added_vocab())
        if len(tokenizer) - rows > max(added, 1):
            raise InputError(
                f"tokenizer has {len(tokenizer)} tokens but the model only {rows} embedding rows: "
                "the tokenizer does not belong to this model"
            )
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id


# ---------------------------------------------------------------------------------------------
# packed attention: the rows of a padded batch run as one row of their real tokens

PACKED_SDPA = "sdpa_packed"
PACKED_VARLEN = "varlen_packed"
PACKED_FLEX = "flex_packed"
PackedAttention = Literal["sdpa_packed", "varlen_packed", "flex_packed"]
"""How packed rows attend: the attention implementation our loaders give a model (`attention=`).
- sdpa_packed: one SDPA call per row (the default; CPU packs with it, CUDA does not pack).
- varlen_packed: all rows in one call of torch's `varlen_attn` (FlashAttention-2 kernels: CUDA,
  bf16/fp16), forward and backward; a model loaded with it packs on CUDA too.
- flex_packed: all rows in one `flex_attention` call with a block mask of the rows (compiled to
  Triton on CUDA; on CPU forward only, uncompiled); a model loaded with it packs on CUDA too.
  The fallback where FlashAttention has no kernels for the GPU: on the DGX Spark (sm_121) cuDNN's
  varlen backward is reported unsupported (torch's `varlen_attn` does not use cuDNN; whether its
  FlashAttention kernels run on sm_121 is what bench/gpu_issue17.py checks there), while
  Triton compiles for any recent GPU.
Which one pays on a GPU is measured by bench/gpu_issue17.py (issue 17); none is claimed faster
yet, so the loaders keep sdpa_packed. Generation, masks and KV caches use transformers' SDPA
under all three."""


def sdpa_packed(
    module,
    query,
    key,
    value,
    attention_mask,
    dropout: float = 0.0,
    scaling=None,
    is_causal=None,
    segments=None,
    **kwargs,
):
    """SDPA that also runs packed rows: given `segments` ((start, end) of each row inside the one
    packed row, from `hidden_states`), causal attention within each segment only; otherwise
    transformers' own SDPA (generation, masks, KV cache)."""
    if segments is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    p = dropout if module.training else 0.0
    outputs = [
        F.scaled_dot_product_attention(
            query[:, :, s:e],
            key[:, :, s:e],
            value[:, :, s:e],
            dropout_p=p,
            is_causal=True,
            scale=scaling,
            enable_gqa=True,
        )
        for s, e in segments
    ]
    return torch.cat(outputs, 2).transpose(1, 2), None


def sdpa_packed_mask(**kwargs):
    # a packed call passes no attention mask: `sdpa_packed` bounds the attention by its segments
    # (transformers would otherwise build a (N, N) block-diagonal mask from the position ids)
    return None if kwargs.get("attention_mask") is None else sdpa_mask(**kwargs)


def one_dtype(query, key, value) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v in one dtype: under autocast the rotary embedding leaves q and k in fp32 and v in
    bf16 (SDPA is on autocast's cast list; varlen_attn and flex_attention are not)."""
    device = query.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else query.dtype
    return query.to(dtype), key.to(dtype), value.to(dtype)


def varlen_packed(
    module,
    query,
    key,
    value,
    attention_mask,
    dropout: float = 0.0,
    scaling=None,
    is_causal=None,
    cu_seqlens=None,
    max_seqlen=None,
    **kwargs,
):
    """`sdpa_packed` with the rows in one FlashAttention varlen call: `cu_seqlens` (rows + 1,) int32
    offsets of the rows in the packed row and `max_seqlen` the longest, from `hidden_states`."""
    if cu_seqlens is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    query, key, value = one_dtype(query, key, value)
    if not query.is_cuda or query.dtype not in (torch.float16, torch.bfloat16):
        raise InputError(
            f"{PACKED_VARLEN} attention runs on CUDA in bf16/fp16 only (got {query.device.type}, {query.dtype}): use "
            f"bf16 autocast on a GPU, or {PACKED_SDPA}"
        )
    from torch.nn.attention.varlen import varlen_attn

    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # (N, heads, D)
    # torch 2.10 spells causal `is_causal`, later ones `window_size=(-1, 0)`; GQA and `scale`
    # came later too (the lent GPU's image has an older torch than ours)
    accepts = inspect.signature(varlen_attn).parameters
    kwargs = {"window_size": (-1, 0)} if "window_size" in accepts else {"is_causal": True}
    if "enable_gqa" in accepts:
        kwargs["enable_gqa"] = True
    elif k.shape[1] != q.shape[1]:  # query head h reads KV head h // groups, as transformers' repeat_kv
        k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
    if "scale" in accepts:
        kwargs["scale"] = scaling
    elif scaling is not None and not math.isclose(scaling, q.shape[-1] ** -0.5):
        raise InputError(
            f"this torch's varlen_attn has no scale argument and the model scales by {scaling}: use {PACKED_SDPA} or a "
            "newer torch"
        )
    out = varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kwargs)
    return out[None], None  # (1, N, heads, D)


@functools.cache
def compiled_flex_attention():
    # flex_attention is only fast compiled (Triton); uncompiled it is a reference implementation
    return torch.compile(flex_attention)


def flex_packed(
    module,
    query,
    key,
    value,
    attention_mask,
    dropout: float = 0.0,
    scaling=None,
    is_causal=None,
    block_mask=None,
    **kwargs,
):
    """`sdpa_packed` with the rows in one `flex_attention` call: `block_mask` lets each token see
    the earlier tokens of its own row (from `hidden_states`)."""
    if block_mask is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    if not query.is_cuda and query.requires_grad:
        raise InputError(
            f"{PACKED_FLEX} attention has no backward on CPU (torch's flex_attention): train on CPU with {PACKED_SDPA}"
        )
    attend = compiled_flex_attention() if query.is_cuda else flex_attention
    query, key, value = one_dtype(query, key, value)
    out = attend(query, key, value, block_mask=block_mask, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2), None


for _name, _attention in ((PACKED_SDPA, sdpa_packed), (PACKED_VARLEN, varlen_packed), (PACKED_FLEX, flex_packed)):
    AttentionInterface.register(_name, _attention)
    AttentionMaskInterface.register(_name, sdpa_packed_mask)


def packing_kwargs(model: PreTrainedModel, lengths: list[int], device) -> dict:
    """What the model's packed attention needs to keep the packed rows of `lengths` apart."""
    kind = model.config._attn_implementation
    if kind == PACKED_VARLEN:
        cu_seqlens = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)
        return {"cu_seqlens": cu_seqlens, "max_seqlen": max(lengths)}
    if kind == PACKED_FLEX:
        # (N,) row of each token
        row = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))

        def same_row_causal(b, h, q, kv):
            return (row[q] == row[kv]) & (kv <= q)

        n = len(row)
        return {"block_mask": create_block_mask(same_row_causal, None, None, n, n, device=device)}
    ends = list(itertools.accumulate(lengths))
    return {"segments": [(end - n, end) for n, end in zip(lengths, ends) if n > 0]}


def load_policy(
    path: str,
    tokenizer,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    revision: str | None = None,
    attention: PackedAttention = PACKED_SDPA,
) -> PreTrainedModel:
    check_checkpoint(path, "policy")
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation=attention, revision=revision, use_safetensors=True
    )
    fit_embeddings(model, tokenizer)
    return model.to(device)


def load_reward_model(
    path: str,
    tokenizer,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    *,
    new_head: bool = False,
    attention: PackedAttention = PACKED_SDPA,
) -> PreTrainedModel:
    """A reward checkpoint, or (new_head=True) a causal-LM backbone with a fresh N+ scalar head."""
    check_checkpoint(path, "policy" if new_head else "reward")
    verbosity = transformers.logging.get_verbosity()
    if new_head:
        transformers.logging.set_verbosity_error()  # "score.weight MISSING" is the point: we init it next
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, dtype=dtype, attn_implementation=attention, use_safetensors=True
        )
    finally:
        transformers.logging.set_verbosity(verbosity)
    if new_head:
        # N+ detail: head weight ~ N(0, 1/sqrt(d+1)), no offset (HF's head has no bias term: the
        # normalising offset lives in config.score_bias, which `get_score` adds)
        d = model.config.hidden_size
        torch.nn.init.normal_(model.score.weight, std=1 / math.sqrt(d + 1))
        model.config.score_bias = 0.0
    fit_embeddings(model, tokenizer)
    return model.to(device)


def disable_dropout(model: torch.nn.Module) -> None:
    """N+: dropout off in every model (Qwen2 has none; other bases may)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


# ---------------------------------------------------------------------------------------------
# forwards


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) positions counted over attended tokens only: left padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def hidden_states(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, pack: bool | None = None
) -> torch.Tensor:
    """(B, T, H) last hidden states of the backbone, without the LM or score head.

    With `pack` (the default on CPU) the real tokens of all rows run as one packed row, each
    row attending causally to its own tokens only (`sdpa_packed`), and come back in the (B, T)
    layout with zeros at the padding: the same states as the padded forward, without computing
    the padding (12-30% of a length-sorted PPO micro-batch; a PPO update 1.2x faster on CPU).
    Every attention implementation gives the same result (transformers reads packed rows from
    the restarting position ids); ours skips the (N, N) mask. Off by default on CUDA, where its
    per-row SDPA calls measured 2x slower than the padded forward (H200, bench/gpu_results),
    unless the model was loaded with a one-call packed attention (`PackedAttention`).
    """
    if pack is None:
        pack = input_ids.device.type == "cpu" or model.config._attn_implementation in (PACKED_VARLEN, PACKED_FLEX)
    if not pack:
        out = model.base_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids(attention_mask),
            use_cache=False,
        )
        return out.last_hidden_state
    keep = attention_mask.bool()
    lengths = keep.sum(1).tolist()
    positions = position_ids(attention_mask)[keep]
    packing = packing_kwargs(model, lengths, input_ids.device)
    out = model.base_model(
        input_ids=input_ids[keep][None], position_ids=positions[None], use_cache=False, **packing
    ).last_hidden_state
    hidden = out.new_zeros(*input_ids.shape, out.shape[-1])
    hidden[keep] = out[0]
    return hidden


def lm_loss_sum(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    pack: bool | None = None,
) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over labels != -100, and their count.

    The LM head (151,936 wide on Qwen2.5, about a third of the 0.5B model's FLOPs) runs only at
    the positions that have a label: ~35 of ~370 tokens per SFT row. Callers divide by the
    number of labelled tokens of the whole optimizer batch, so gradient accumulation is exact.
    """
    hidden = hidden_states(model, input_ids, attention_mask, pack=pack)[:, :-1]  # (B, T-1, H): position t predicts t+1
    targets = labels[:, 1:]
    keep = targets != -100
    logits = model.get_output_embeddings()(hidden[keep])  # (N, V)
    return F.cross_entropy(logits.float(), targets[keep], reduction="sum"), int(keep.sum())


def response_logits(
    model: PreTrainedModel,
    query_responses: torch.Tensor,
    attention_mask: torch.Tensor,
    context_length: int,
    temperature: float,
    pack: bool | None = None,
) -> torch.Tensor:
    """(B, R, V) logits / temperature that predict the R response tokens after `context_length`.

    N+ detail: the training forward divides by the sampling temperature, so the log-probs of
    the rollout and of the first PPO minibatch agree and the first ratio is exactly 1.
    """
    hidden = hidden_states(model, query_responses, attention_mask, pack=pack)[:, context_length - 1 : -1]
    return model.get_output_embeddings()(hidden).float() / temperature


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(B, R) log-probability of `tokens` under `logits` (B, R, V)."""
    return torch.gather(logits.log_softmax(-1), 2, tokens.unsqueeze(-1)).squeeze(-1)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of the rightmost attended token: the EOS of a truncated response."""
    T = attention_mask.shape[1]
    return T - 1 - attention_mask.long().flip(-1).argmax(-1)


def get_score(
    reward_model: PreTrainedModel, query_responses: torch.Tensor, attention_mask: torch.Tensor, pack: bool | None = None
) -> torch.Tensor:
    """(B,) reward-model score of each query+response, read at its last real token (the EOS).

    The one scoring function: reward.py trains and normalises with it, ppo.py scores rollouts
    with it, evaluate.py judges with it. It pools by the attention mask, so left or right
    padding and any pad id give the same score, and adds `config.score_bias`, the N+
    normalisation offset (references average 0).
    """
    hidden = hidden_states(reward_model, query_responses, attention_mask, pack=pack)  # (B, T, H)
    last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(attention_mask)]  # (B, H)
    return reward_model.score(last).squeeze(-1).float() + getattr(reward_model.config, "score_bias", 0.0)


def pair_hidden_states(
    model: PreTrainedModel,
    queries: torch.Tensor,
    query_mask: torch.Tensor,
    responses: torch.Tensor,
    response_mask: torch.Tensor,
    share_prefix: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states of two responses per query: (2B, H) at each query's last token and
    (2B, Tr, H) at the response tokens, rows chosen_1, rejected_1, chosen_2, ...

    queries (B, Tq) left padded; responses (2B, Tr) right padded, two per query. With
    `share_prefix` the query (~340 of ~375 tokens) runs once and both responses run on a copy of
    its KV cache, about half the tokens of two full rows, with the same states and gradients;
    gradient checkpointing drops the cache, so it needs `share_prefix=False` (two full rows).
    The reward step reads the score from these (`get_pair_scores`), DPO the log-probs
    (`get_pair_logprobs`).
    """
    if not share_prefix:
        full_mask = torch.cat([query_mask.repeat_interleave(2, 0), response_mask], 1)
        hidden = hidden_states(model, torch.cat([queries.repeat_interleave(2, 0), responses], 1), full_mask)
        return hidden[:, queries.shape[1] - 1], hidden[:, queries.shape[1] :]
    out = model.base_model(
        input_ids=queries, attention_mask=query_mask, position_ids=position_ids(query_mask), use_cache=True
    )
    cache = out.cache
    cache.batch_repeat_interleave(2)  # keeps the graph: gradients reach the query through both responses
    mask = torch.cat([query_mask.repeat_interleave(2, 0), response_mask], 1)
    positions = (
        query_mask.sum(1).repeat_interleave(2)[:, None]
        + torch.arange(responses.shape[1], device=responses.device)[None]
    )
    hidden = model.base_model(
        input_ids=responses, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True
    ).last_hidden_state
    return out.last_hidden_state[:, -1].repeat_interleave(2, 0), hidden


def get_pair_scores(
    reward_model: PreTrainedModel,
    queries: torch.Tensor,
    query_mask: torch.Tensor,
    responses: torch.Tensor,
    response_mask: torch.Tensor,
    share_prefix: bool = True,
) -> torch.Tensor:
    """(2B,) scores of rows chosen_1, rejected_1, chosen_2, ...: `get_score` of each query+summary,
    each query run once (`pair_hidden_states`)."""
    _, hidden = pair_hidden_states(reward_model, queries, query_mask, responses, response_mask, share_prefix)
    last = hidden[torch.arange(hidden.shape[0], device=hidden.device), response_mask.sum(1) - 1]  # each summary's EOS
    return reward_model.score(last).squeeze(-1).float() + getattr(reward_model.config, "score_bias", 0.0)


def get_pair_logprobs(
    policy: PreTrainedModel,
    queries: torch.Tensor,
    query_mask: torch.Tensor,
    responses: torch.Tensor,
    response_mask: torch.Tensor,
    share_prefix: bool = True,
) -> torch.Tensor:
    """(2B, Tr) log-probability of each response token under `policy` (0 on padding), rows
    chosen_1, rejected_1, chosen_2, ..., each query run once (`pair_hidden_states`).

    Response token t is predicted at the position before it: the query's last token for t = 0.
    The LM head runs only at real response tokens (the 151,936-wide head would otherwise
    dominate: ~35 of ~375 positions are response tokens).
    """
    query_last, hidden = pair_hidden_states(policy, queries, query_mask, responses, response_mask, share_prefix)
    hidden = torch.cat([query_last[:, None], hidden[:, :-1]], 1)  # (2B, Tr, H): position t predicts token t
    keep = response_mask.bool()
    logits = policy.get_output_embeddings()(hidden[keep])  # (N, V)
    logprobs = torch.zeros(responses.shape, dtype=torch.float32, device=responses.device)
    logprobs[keep] = -F.cross_entropy(logits.float(), responses[keep], reduction="none")
    return logprobs
