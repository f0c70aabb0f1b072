"""Sampling summaries: one loop for SFT evaluation, PPO rollouts, evaluate.py and this CLI.

    python -m dgx_spark_summary_from_human_feedback.generation --checkpoint out/sft \\
        --dataset vwxyzjn/summarize_from_feedback_tldr_3_filtered --split validation --num-samples 8
    python -m dgx_spark_summary_from_human_feedback.generation --checkpoint out/ppo --prompt-file posts.jsonl

Our own loop over a KV cache rather than `model.generate`: sampling is exactly softmax(logits /
T) with optional top-k/top-p and nothing else (no generation_config.json of the checkpoint can
add a repetition penalty), it draws from a `torch.Generator` we checkpoint, and it does not stop
at EOS unless asked (the N+ "EOS trick" samples a fixed number of tokens, then truncates).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from . import cli
from .checkpoint import make_output_dir
from .data import is_processed, json_lines, left_pad, load_processed, load_raw, load_tokenizer, truncate_query
from .errors import InputError
from .models import load_policy, position_ids
from .preprocess import sft_query_fields
from .training import frozen_dtype, setup_runtime
from .tracking import markdown_table


def sample_next(
    logits: torch.Tensor,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(B,) next tokens from (B, V) logits; temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest set reaching top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(remove, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


Decoding = Literal["eager", "static", "cuda_graph"]
"""How `generate` runs its one-token decoding steps (issue 17):
- eager: a KV cache and mask that grow by one column per step, as transformers does.
- static: the KV cache, key mask and positions allocated once for the whole response and updated
  in place, so every step has the same shapes and addresses; the same tokens as eager.
- cuda_graph: static, with the decoding step captured once per `generate` call in a CUDA graph
  and replayed: one launch per step instead of a dozen per layer. CUDA only.
eager is the default on CPU and, until bench/gpu_issue17.py has measured the others on a GPU,
on CUDA too."""


def prefill(model, queries: torch.Tensor, query_mask: torch.Tensor):
    """(B, V) next-token logits after the left-padded `queries` (B, Tq), and their KV cache."""
    mask = query_mask.long()
    out = model(
        input_ids=queries, attention_mask=mask, position_ids=position_ids(mask), use_cache=True, logits_to_keep=1
    )
    return out.logits[:, -1], out.cache


def eager_decoder(model, queries: torch.Tensor, query_mask: torch.Tensor):
    """Prefill; return the (B, V) logits and `decode(next_tokens (B,)) -> (B, V) logits`."""
    logits, cache = prefill(model, queries, query_mask)
    mask = query_mask.long()

    def decode(next_tokens: torch.Tensor) -> torch.Tensor:
        nonlocal mask, cache
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        out = model(
            input_ids=next_tokens[:, None],
            attention_mask=mask,
            position_ids=mask.sum(-1, keepdim=True) - 1,
            cache=cache,
            use_cache=True,
        )
        cache = out.cache
        return out.logits[:, -1]

    return logits, decode


def static_decoder(model, queries: torch.Tensor, query_mask: torch.Tensor, max_new_tokens: int, cuda_graph: bool):
    """As `eager_decoder`, over a StaticCache of L = Tq + max_new_tokens - 1 slots, slot Tq + t
    holding the t-th sampled token. A step reads and writes only tensors allocated here (ids,
    positions, key mask, cache) and advances them in place, so one captured step replays as the
    next. The prefill is eager's own forward (same logits); its keys and values are copied in."""
    from transformers import StaticCache

    if any(kind != "full_attention" for kind in getattr(model.config, "layer_types", None) or []):
        raise InputError(
            f"static decoding needs full attention in every layer ({model.config.model_type} has sliding-window "
            "layers): use --decoding eager"
        )
    B, Tq = queries.shape
    logits, prefilled = prefill(model, queries, query_mask)
    cache = StaticCache(config=model.config, max_cache_len=Tq + max_new_tokens - 1)
    for i, layer in enumerate(prefilled.layers):
        cache.update(layer.keys, layer.values, i)
    del prefilled
    # (B, L) slots each row attends to
    key_mask = torch.zeros(B, Tq + max_new_tokens - 1, dtype=torch.bool, device=queries.device)
    key_mask[:, :Tq] = query_mask.bool()
    slot = torch.tensor([Tq], device=queries.device)  # (1,) the slot this step writes
    positions = query_mask.long().sum(-1, keepdim=True)  # (B, 1) position of the token this step reads
    ids = torch.zeros(B, 1, dtype=torch.long, device=queries.device)

    def step() -> torch.Tensor:
        key_mask.index_fill_(1, slot, True)
        # a 4D mask goes to the attention as is: no per-step mask building, no host sync
        out = model(
            input_ids=ids,
            attention_mask=key_mask[:, None, None, :],
            position_ids=positions,
            cache=cache,
            use_cache=True,
        )
        slot.add_(1)
        positions.add_(1)
        return out.logits[:, -1]

    graph = None

    def decode(next_tokens: torch.Tensor) -> torch.Tensor:
        nonlocal graph
        ids.copy_(next_tokens[:, None])
        if not cuda_graph:
            return step()
        if graph is None:  # captured at the first step: the cache is filled and the ids are real
            state = [key_mask, slot, positions, *(layer.cumulative_length for layer in cache.layers)]
            graph = capture(step, state)
        graph[0].replay()
        return graph[1]

    return logits, decode


def capture(step, state: list[torch.Tensor]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """A CUDA graph of one call of `step`, and its output tensor (rewritten by each replay).

    The warm-up call (outside the graph, on a side stream, as CUDA graphs require: cuBLAS
    workspaces, autocast's weight copies) advances `state`, so it is rewound; the keys and values
    it wrote are the ones the first replay writes again. Autocast's cached weight copies are read
    by the replays: they live until the caller's autocast exits, after `generate` returns.
    """
    saved = [t.clone() for t in state]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    for tensor, value in zip(state, saved):
        tensor.copy_(value)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits = step()
    return graph, logits


@torch.no_grad()
def generate(
    model,
    queries: torch.Tensor,
    query_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    eos_token_id: int | None = None,
    decoding: Decoding = "eager",
) -> torch.Tensor:
    """(B, max_new_tokens) sampled tokens after left-padded `queries` (B, Tq).

    Samples every position, EOS included: pass `eos_token_id` only to stop early once every row
    has produced one (the tokens after a row's EOS are then arbitrary; truncate them). `decoding`
    changes how the steps run (`Decoding`), not what they compute: sampling draws from the same
    logits in the same order, so a generator state gives the same tokens.
    """
    if decoding == "cuda_graph" and queries.device.type != "cuda":
        raise InputError(
            f"decoding cuda_graph needs a CUDA device (the model is on {queries.device.type}): use --decoding static "
            "or eager"
        )
    if decoding == "eager":
        logits, decode = eager_decoder(model, queries, query_mask)
    else:
        logits, decode = static_decoder(model, queries, query_mask, max_new_tokens, cuda_graph=decoding == "cuda_graph")
    tokens, done = [], torch.zeros(queries.shape[0], dtype=torch.bool, device=queries.device)
    for t in range(max_new_tokens):
        next_tokens = sample_next(logits, temperature, top_k, top_p, generator)
        tokens.append(next_tokens)
        if eos_token_id is not None:
            done |= next_tokens == eos_token_id
            if bool(done.all()):
                break
        if t == max_new_tokens - 1:
            break
        logits = decode(next_tokens)
    responses = torch.stack(tokens, dim=1)
    if responses.shape[1] < max_new_tokens:  # stopped early: every row already has its EOS
        fill = responses.new_full((responses.shape[0], max_new_tokens - responses.shape[1]), eos_token_id)
        responses = torch.cat([responses, fill], dim=1)
    return responses


def truncate_after_eos(
    responses: torch.Tensor, eos_token_id: int, pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """N+ EOS trick, step 1: keep each response up to and including its first EOS.

    Returns (responses with everything after the first EOS set to pad, (B, R) mask of kept
    tokens, (B,) whether the row has an EOS). Rows without EOS keep all tokens.
    """
    R = responses.shape[1]
    is_eos = responses == eos_token_id  # generated tokens: EOS here is EOS, not padding
    has_eos = is_eos.any(-1)
    first = torch.where(has_eos, is_eos.int().argmax(-1), torch.full_like(has_eos, R - 1, dtype=torch.long))
    keep = torch.arange(R, device=responses.device)[None, :] <= first[:, None]
    return torch.where(keep, responses, pad_token_id), keep, has_eos


def pad_queries(query_tokens: list[list[int]], pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad unpadded query ids to the longest: (B, T) ids and mask."""
    T = max(len(q) for q in query_tokens)
    ids = torch.tensor([left_pad(q, T, pad_token_id) for q in query_tokens], device=device)
    mask = torch.tensor([[0] * (T - len(q)) + [1] * len(q) for q in query_tokens], device=device)
    return ids, mask


def summarize(
    model,
    tokenizer,
    query_tokens: list[list[int]],
    *,
    batch_size: int,
    max_new_tokens: int,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    autocast=None,
    decoding: Decoding = "eager",
) -> list[dict]:
    """Generate one EOS-truncated summary per query: [{response, response_token, has_eos}]."""
    import contextlib

    generator = torch.Generator(device=model.device).manual_seed(seed)
    order = sorted(range(len(query_tokens)), key=lambda i: -len(query_tokens[i]))  # similar lengths together
    by_index = {}
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        ids, mask = pad_queries([query_tokens[i] for i in idx], tokenizer.pad_token_id, model.device)
        with autocast() if autocast else contextlib.nullcontext():
            responses = generate(
                model,
                ids,
                mask,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                generator=generator,
                eos_token_id=tokenizer.eos_token_id,
                decoding=decoding,
            )
        responses, keep, has_eos = truncate_after_eos(responses, tokenizer.eos_token_id, tokenizer.pad_token_id)
        for row, i in enumerate(idx):
            tokens = responses[row][keep[row]].tolist()
            by_index[i] = {
                "response": tokenizer.decode(tokens, skip_special_tokens=True),
                "response_token": tokens,
                "has_eos": bool(has_eos[row]),
            }
    return [by_index[i] for i in range(len(query_tokens))]


# ---------------------------------------------------------------------------------------------
# the CLI


def query_tokens_of(rows: list[dict], tokenizer, query_length: int) -> list[list[int]]:
    """Unpadded query ids: from a processed dataset's `query_token`, else formatted as in training."""
    out = []
    for row in rows:
        if "query_token" in row:
            ids = list(row["query_token"])
            n = row.get("query_token_len")
            if n is None:  # left padded: the query is everything after the leading run of padding
                n = len(ids) - next((i for i, t in enumerate(ids) if t != tokenizer.pad_token_id), len(ids))
            out.append(ids[len(ids) - n :])
        else:
            ids, _, _ = truncate_query(tokenizer, sft_query_fields(row), length=query_length)
            out.append(ids)
    return out


def load_rows(dataset: str | None, split: str, num_samples: int, prompt_file: str | None) -> list[dict]:
    if prompt_file:
        path = Path(prompt_file)
        if not path.exists():
            raise InputError(f"prompt file {prompt_file} does not exist")
        rows = []
        for n, row in json_lines(path):
            if isinstance(row, str):
                row = {"subreddit": "", "title": "", "post": row}
            if not isinstance(row, dict):
                raise InputError(
                    f"{prompt_file} line {n}: {type(row).__name__}, expected a post string or an object with "
                    "subreddit, title, post"
                )
            row.setdefault("id", f"line{n}")
            rows.append(row)
        return rows[:num_samples] if num_samples else rows
    if dataset is None:
        raise InputError("pass --dataset or --prompt-file")
    loaded = load_processed(dataset, (split,)) if is_processed(dataset) else load_raw(dataset, split=split)
    if split not in loaded:
        raise InputError(f"{dataset}: split {split!r} missing (has {list(loaded)}): pass --split")
    ds = loaded[split]
    n = len(ds) if not num_samples else min(num_samples, len(ds))
    return [ds[i] for i in range(n)]


@dataclass
class Config:
    checkpoint: str
    """causal-LM checkpoint: our stage output directory or a Hub name"""
    dataset: str | None = None
    """TL;DR posts: Hub name, local .jsonl/.json/.parquet, or a processed save_to_disk directory"""
    split: str = "validation"
    """split of --dataset"""
    prompt_file: str | None = None
    """JSON lines, each a post string or an object with subreddit, title, post"""
    num_samples: int = 8
    """how many posts to summarise (0 = all)"""
    tokenizer: str | None = None
    """tokenizer (default: the checkpoint's)"""
    query_length: int = 512
    """query budget, as in training"""
    max_new_tokens: int = 63
    """response budget (tokens, EOS included)"""
    temperature: float = 0.7
    """sampling temperature (0 = greedy; N+ evaluates at 0.01)"""
    top_k: int = 0
    """keep only the k most likely tokens (0 = off)"""
    top_p: float = 1.0
    """nucleus sampling mass (1 = off)"""
    batch_size: int = 16
    """queries per generation batch (left padded)"""
    decoding: Decoding = "eager"
    """decoding steps: eager, static (preallocated KV cache) or cuda_graph (static, replayed as a CUDA graph)"""
    seed: int = 0
    """sampling seed"""
    device: str = "auto"
    """cuda, cpu or auto"""
    output: str | None = None
    """JSONL file for the samples (default: print only)"""


def main(cfg: Config) -> list[dict]:
    runtime = setup_runtime(cfg.device)
    if cfg.output:
        make_output_dir(Path(cfg.output).parent, "--output")
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.checkpoint)
    model = load_policy(cfg.checkpoint, tokenizer, dtype=frozen_dtype(runtime), device=runtime.device).eval()
    rows = load_rows(cfg.dataset, cfg.split, cfg.num_samples, cfg.prompt_file)
    queries = query_tokens_of(rows, tokenizer, cfg.query_length)
    samples = summarize(
        model,
        tokenizer,
        queries,
        batch_size=cfg.batch_size,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        seed=cfg.seed,
        autocast=runtime.autocast,
        decoding=cfg.decoding,
    )
    records = []
    for row, q, s in zip(rows, queries, samples):
        reference = row.get("summary") or row.get("reference_response")
        records.append({"id": row.get("id"), "query": tokenizer.decode(q), "reference": reference, **s})
    print(markdown_table(records, ["id", "query", "response", "has_eos"], max_chars=120))
    if cfg.output:
        Path(cfg.output).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        print(f"wrote {cfg.output}")
    return records


if __name__ == "__main__":
    cli.run(main, Config)
