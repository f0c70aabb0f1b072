"""Pieces every training stage calls: lr schedule, optimizer, seeding, device and precision, batches.

Shared functions, not a trainer: each stage script keeps its own loop (STYLE.md).
"""

from __future__ import annotations

import contextlib
import math
import os
import random
from dataclasses import dataclass
from typing import Iterator, Literal

import torch
import torch.distributed as dist

from .errors import InputError

Precision = Literal["auto", "bf16-autocast", "fp32", "bf16"]
OptimizerKind = Literal["auto", "adamw8bit", "adamw-fused", "adamw"]
Strategy = Literal["ddp", "fsdp2"]


# ---------------------------------------------------------------------------------------------
# learning rate


def get_lr(
    step: int, *, lr: float, min_lr: float, warmup_steps: int, decay_steps: int, schedule: str = "cosine"
) -> float:
    """nanoGPT's schedule: linear warmup, then cosine (or linear) decay to `min_lr` at
    `decay_steps`, flat after."""
    if step < warmup_steps:
        return lr * (step + 1) / (warmup_steps + 1)
    if step >= decay_steps:
        return min_lr
    ratio = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
    coeff = 1.0 - ratio if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * ratio))
    return min_lr + coeff * (lr - min_lr)


# ---------------------------------------------------------------------------------------------
# optimizer


def make_optimizer(
    params: list[torch.nn.Parameter],
    *,
    lr: float,
    betas: tuple[float, float],
    weight_decay: float,
    eps: float,
    kind: OptimizerKind,
    device: torch.device,
    sharded: bool = False,
) -> torch.optim.Optimizer:
    """AdamW with weight decay on >= 2-D weights only (matrices and embeddings, not norms/biases).

    `auto`: bitsandbytes 8-bit AdamW on CUDA (optimizer state 4x smaller: what lets a 1.5B RM
    and PPO's two trainable 0.5B models sit in the Spark's memory), torch's fused AdamW on CPU.
    """
    params = [p for p in params if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    if kind == "auto":
        # FSDP2 shards parameters as DTensors, which bitsandbytes' kernels do not take
        kind = "adamw8bit" if device.type == "cuda" and not sharded else "adamw-fused"
    if kind == "adamw8bit":
        if device.type != "cuda":
            raise InputError("--optimizer adamw8bit needs a CUDA device: use adamw-fused or adamw on CPU")
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, lr=lr, betas=betas, eps=eps)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=kind == "adamw-fused")


def check_finite(step: int, terms: dict[str, float], out_dir) -> None:
    """NaN/Inf guard: stop before a non-finite update is applied, naming the step, the loss terms
    and the last good checkpoint, instead of training on garbage for hours."""
    if all(math.isfinite(v) for v in terms.values()):
        return
    from .checkpoint import latest_checkpoint

    values = ", ".join(f"{k}={v:.4g}" for k, v in terms.items())
    last = latest_checkpoint(out_dir)
    raise InputError(
        f"step {step}: non-finite training values ({values}); the update was not applied. Last good checkpoint: "
        f"{last if last else 'none yet'}; rerun with --resume (and e.g. a lower --lr) to continue from it"
    )


def clip_gradients(params, max_norm: float) -> float:
    """Clip the global gradient norm to `max_norm` (0 = no clipping) and return the norm before
    clipping, gathered in full when FSDP2 holds the gradients as DTensor shards."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


# ---------------------------------------------------------------------------------------------
# seeding, device, precision, distributed


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds CUDA


@dataclass
class Runtime:
    """Where and how a stage runs: device, dtypes, and its place in a torchrun job."""

    device: torch.device
    param_dtype: torch.dtype  # dtype of trainable weights (fp32 master weights by default)
    autocast_dtype: torch.dtype | None  # bf16 autocast on CUDA by default
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)


def setup_runtime(device: str = "auto", precision: Precision = "auto", tiny_model: bool = False) -> Runtime:
    """Pick the device, the precision and (under torchrun) the process group.

    `auto` precision is fp32 master weights with bf16 autocast on CUDA (pure bf16 loses
    updates: at lr 3e-6 most steps are below bf16's resolution), plain fp32 on CPU.
    `tiny_model` (the smoke presets): one CPU thread, twice as fast as two on the 2-layer model,
    whose matmuls are too small to repay the threads' start-up.
    """
    if tiny_model and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and world_size > 1:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    if precision == "auto":
        precision = "bf16-autocast" if dev.type == "cuda" else "fp32"
    param_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    autocast_dtype = torch.bfloat16 if precision == "bf16-autocast" else None
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # cuDNN's SDPA (torch 2.11's first choice for masked bf16 attention on Hopper) gave NaN
    # gradients through the reward model's shared-prefix KV cache on an H200 (finite under the
    # math and memory-efficient kernels), and plans a graph for every new sequence length (2.3 ms
    # of CPU per call, every decoding step too): SFT ran at 2.7x and PPO at 1.9x without it
    # (bench/gpu_results). Flash or memory-efficient attention instead; no effect off CUDA.
    torch.backends.cuda.enable_cudnn_sdp(False)
    return Runtime(dev, param_dtype, autocast_dtype, rank, world_size)


def frozen_dtype(runtime: Runtime) -> torch.dtype:
    """Frozen models (reference, reward) run in bf16 on CUDA to halve their memory."""
    return torch.bfloat16 if runtime.device.type == "cuda" else runtime.param_dtype


# ---------------------------------------------------------------------------------------------
# batches


def steps_per_epoch(n_rows: int, batch_size: int) -> int:
    steps = n_rows // batch_size
    if steps == 0:
        raise InputError(f"dataset has {n_rows} rows, fewer than one batch of {batch_size}: lower --batch-size")
    return steps


def micro_batch_layout(batch_size: int, micro_batch_size: int, world_size: int = 1) -> int:
    """grad_accum_steps such that batch_size = micro_batch_size x grad_accum_steps x world_size."""
    per_rank, rest = divmod(batch_size, world_size)
    if rest or per_rank % micro_batch_size:
        raise InputError(
            f"--batch-size {batch_size} is not divisible by --micro-batch-size {micro_batch_size} x {world_size} "
            "process(es): "
            "pick sizes where batch = micro x grad-accum x processes"
        )
    return per_rank // micro_batch_size


def batch_indices(step: int, n_rows: int, batch_size: int, seed: int) -> list[int]:
    """Rows of optimizer step `step`: epoch e is a fresh permutation seeded by (seed, e).

    The data position is a pure function of the step, so resuming at step k replays exactly
    the rows an uninterrupted run would have seen.
    """
    per_epoch = steps_per_epoch(n_rows, batch_size)
    epoch, k = divmod(step, per_epoch)
    order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return order[k * batch_size : (k + 1) * batch_size].tolist()


def micro_batches(
    indices: list[int], lengths: list[int], micro_batch_size: int, rank: int = 0, world_size: int = 1
) -> Iterator[list[int]]:
    """Split one optimizer batch into micro-batches of similar length (this rank's share).

    Sorting by length inside the batch groups long rows with long rows, so dynamic padding
    wastes little; the gradient is that of the whole batch whatever the grouping.
    """
    order = sorted(range(len(indices)), key=lambda i: -lengths[i])
    share = order[rank::world_size]
    for start in range(0, len(share), micro_batch_size):
        yield [indices[i] for i in share[start : start + micro_batch_size]]


# the columns of a preference row that `pair_batch` reads (reward model and DPO)
PAIR_COLUMNS = [
    "query_token",
    "query_token_len",
    "chosen_token",
    "chosen_token_len",
    "rejected_token",
    "rejected_token_len",
]


def pair_batch(rows: dict, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, Tq) queries left padded to the longest and their mask; (2B, Tr) summaries (chosen,
    rejected, chosen, ...) right padded to the longest and their mask. Lengths, not pad ids."""
    query_lengths = rows["query_token_len"]
    Tq = int(query_lengths.max())
    queries = rows["query_token"][:, -Tq:]
    query_mask = torch.arange(Tq)[None, :] >= (Tq - query_lengths)[:, None]
    lengths = torch.stack([rows["chosen_token_len"], rows["rejected_token_len"]], 1).flatten()  # (2B,)
    Tr = int(lengths.max())
    responses = torch.stack([rows["chosen_token"][:, :Tr], rows["rejected_token"][:, :Tr]], 1).flatten(0, 1)
    response_mask = torch.arange(Tr)[None, :] < lengths[:, None]
    return queries.to(device), query_mask.long().to(device), responses.to(device), response_mask.long().to(device)


def all_reduce_sum(value: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    if runtime.world_size > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


# ---------------------------------------------------------------------------------------------
# distributed training through torch's engines (DDP, FSDP2)


class Forward(torch.nn.Module):
    """`fn(model, *args)` as a module, so DDP can wrap our custom forwards (response-only LM
    head, score at EOS) and still synchronise gradients."""

    def __init__(self, model: torch.nn.Module, fn):
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, *args):
        return self.fn(self.model, *args)


def distribute(model: torch.nn.Module, fn, runtime: Runtime, strategy: Strategy = "ddp") -> torch.nn.Module:
    """Wrap `fn(model, ...)` for this runtime: unchanged in one process; under torchrun DDP
    (default) or FSDP2 (`fully_shard` on each decoder layer and the root, for models whose
    weights and optimizer state do not fit on one device)."""
    wrapper = Forward(model, fn)
    if runtime.world_size == 1:
        return wrapper
    if strategy == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.base_model.layers:
            fully_shard(layer)
        fully_shard(wrapper)  # the root: embeddings, final norm and head gather around each call
        model._is_fully_sharded = True
        return wrapper
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        wrapper, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None
    )


def no_sync(wrapper: torch.nn.Module, skip: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an optimizer step."""
    if hasattr(wrapper, "no_sync"):  # DDP
        return wrapper.no_sync() if skip else contextlib.nullcontext()
    if hasattr(wrapper, "set_requires_gradient_sync"):  # FSDP2
        wrapper.set_requires_gradient_sync(not skip)
    return contextlib.nullcontext()


def full_state_dicts(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, runtime: Runtime
) -> tuple[dict | None, dict]:
    """(model state dict or None when plain, optimizer state dict), gathered in full for saving.

    Collective under FSDP2: every rank must call it. With DDP or one process the model saves
    itself (`save_pretrained`), so only the optimizer's own state dict is returned.
    """
    if not getattr(model, "_is_fully_sharded", False):
        return None, optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a full optimizer state dict saved by `full_state_dicts` (sharding it under FSDP2)."""
    if not getattr(model, "_is_fully_sharded", False):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
