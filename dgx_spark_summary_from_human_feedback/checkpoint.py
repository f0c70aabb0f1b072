"""Checkpoints that survive a kill: atomic step directories, best and last, resume, final export.

Layout of a stage's output directory:

    OUT/                          the final model (HF files: loads with plain from_pretrained)
    OUT/checkpoints/step_000120/  last checkpoint: HF model + tokenizer at its root, extra models
                                  (PPO's value model) in subdirectories, training_state.pt
                                  (optimizer, step, RNG), config.json (the run's config)
    OUT/checkpoints/step_000080/  best checkpoint (kept while it is best; see best.json)
    OUT/checkpoints/best.json     {"step", "metric"}

A checkpoint is written into a temporary directory and renamed into place: a kill at any point
leaves either the old set of checkpoints or the new one, never a half-written one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from .errors import InputError
from .hub import hub_errors

STATE_FILE = "training_state.pt"
CONFIG_FILE = "run_config.json"


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Replace a file's content so that a kill leaves the old or the new text, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_json_atomic(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=str))


def make_output_dir(path: str | Path, option: str = "--output-dir") -> Path:
    """Create an output directory up front: an unwritable path stops with one line naming it,
    before any work, not with a traceback at the first save."""
    out = Path(path).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create output directory {path} ({e.strerror}): pass a writable {option}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise InputError(f"output directory {path} is not writable: pass a writable {option}")
    check_shared(out, option)
    return out


def check_shared(out: Path, option: str = "--output-dir") -> None:
    """Under torchrun, only rank 0 writes checkpoints and the final model, and every process reads
    them back (--resume, FSDP2's final export, the next stage's input): on two machines the output
    directory must be one shared filesystem, mounted at the same path on both. Checked up front
    (rank 0 writes a random token, every process must read it back), so that a second node never
    resumes from step 0 beside a first that resumed from its checkpoint."""
    import socket

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    probe = out / f".shared_check_{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}"
    token = [os.urandom(8).hex() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(token, src=0)
    if dist.get_rank() == 0:
        probe.write_text(token[0])
    dist.barrier()
    seen = probe.read_text() if probe.exists() else None
    views = [None] * dist.get_world_size()
    dist.all_gather_object(views, (dist.get_rank(), socket.gethostname(), seen == token[0]))
    dist.barrier()  # everyone has read it before rank 0 removes it
    if dist.get_rank() == 0:
        probe.unlink(missing_ok=True)
    blind = [f"rank {rank} on {host}" for rank, host, ok in views if not ok]
    if blind:
        raise InputError(
            f"{option} {out} is not shared storage: {', '.join(blind)} cannot see what rank 0 writes there; "
            "on several machines put it (and the input checkpoints) on a shared filesystem mounted at the same path on "
            "every machine"
        )


def step_dirs(out_dir: str | Path) -> list[Path]:
    root = Path(out_dir) / "checkpoints"
    if not root.exists():
        return []
    return sorted(
        (p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and (p / STATE_FILE).exists()),
        key=lambda p: p.name,
    )


def save_checkpoint(
    out_dir: str | Path,
    step: int,
    models: dict[str, torch.nn.Module],
    tokenizer,
    state: dict,
    config: dict,
    metric: float | None = None,
    higher_is_better: bool = False,
    model_state_dicts: dict[str, dict | None] | None = None,
) -> Path:
    """Write checkpoint `step` atomically; keep it and the best one, delete the rest.

    `models`: the first is saved at the directory's root (so `from_pretrained(step_dir)` loads
    it), the others in subdirectories named by their keys. `state` holds tensors and plain
    values only (it is read back with `weights_only=True`). `model_state_dicts` carries full
    weights gathered from FSDP2 shards (see `training.full_state_dicts`).
    """
    root = Path(out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    for i, (name, model) in enumerate(models.items()):
        target = tmp if i == 0 else tmp / name
        state_dict = (model_state_dicts or {}).get(name)
        model.save_pretrained(
            str(target), safe_serialization=True, **({"state_dict": state_dict} if state_dict is not None else {})
        )
        tokenizer.save_pretrained(str(target))
    torch.save({**state, "step": step}, tmp / STATE_FILE)
    (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, default=str))
    _fsync_tree(tmp)
    if final.exists():
        # a resumed run saving the step it resumed at: resumption is exact, so the first copy
        # is kept; deleting it first would leave a window in which a kill loses it
        shutil.rmtree(tmp)
    else:
        os.rename(tmp, final)
        _fsync_dir(root)

    best_file = root / "best.json"
    best = json.loads(best_file.read_text()) if best_file.exists() else None
    if metric is not None and (
        best is None or (metric > best["metric"] if higher_is_better else metric < best["metric"])
    ):
        best = {"step": step, "metric": metric}
        _write_json_atomic(best_file, best)
    keep = {final.name} | ({f"step_{best['step']:06d}"} if best else set())
    for old in root.iterdir():
        if old.name.startswith(".tmp-") and old != tmp:
            shutil.rmtree(old, ignore_errors=True)  # left by a killed save
        elif old.is_dir() and old.name.startswith("step_") and old.name not in keep:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    dirs = step_dirs(out_dir)
    return dirs[-1] if dirs else None


def load_state(step_dir: Path) -> dict:
    try:
        return torch.load(step_dir / STATE_FILE, weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file becomes one line
        raise InputError(
            f"{step_dir / STATE_FILE} cannot be read ({type(e).__name__}): delete that checkpoint directory to resume "
            "from an earlier one"
        ) from None


# Stage Config fields that may change on resume without breaking equivalence with an
# uninterrupted run. tests/test_training.py checks that each is a field of some stage's Config
# (a renamed field must not leave a stale name here) and that every `*_interval` is listed.
RESUME_SAFE_FIELDS = {
    "resume",
    "allow_config_change",
    "max_steps",  # how this invocation runs and where it stops
    "output_dir",
    "wandb_project",
    "push_to_hub",  # where the results go
    "eval_interval",
    "save_interval",
    "sample_interval",
    "num_eval_samples",  # what is reported, how often
    "device",
    "decoding",  # where and how steps run, not what they compute (generation.Decoding)
}


def check_resume_config(saved: dict, current: dict, allow: bool) -> None:
    changed = sorted(
        k for k in set(saved) | set(current) if k not in RESUME_SAFE_FIELDS and saved.get(k) != current.get(k)
    )
    if changed and not allow:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed[:5])
        raise InputError(
            f"resume with a changed config ({detail}): rerun with the saved values or pass --allow-config-change"
        )


def resume_point(out_dir: str | Path, config: dict, allow_config_change: bool) -> tuple[Path, dict] | None:
    """(last checkpoint, its state) to resume from, or None to start fresh."""
    step_dir = latest_checkpoint(out_dir)
    if step_dir is None:
        return None
    if not (step_dir / CONFIG_FILE).exists():
        raise InputError(
            f"{step_dir} has no {CONFIG_FILE}, so its run's settings cannot be checked: "
            "delete that directory to resume from the checkpoint before it, or start without --resume"
        )
    saved = json.loads((step_dir / CONFIG_FILE).read_text())
    current = json.loads(json.dumps(config, default=str))  # compare as saved: tuples become lists
    check_resume_config(saved, current, allow_config_change)
    return step_dir, load_state(step_dir)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def export_final(out_dir: str | Path, model: torch.nn.Module, tokenizer) -> None:
    """Write the final model at OUT's root, each file replaced atomically."""
    out = Path(out_dir)
    tmp = out / f".export-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    _fsync_tree(tmp)
    for f in sorted(tmp.iterdir(), key=lambda p: p.suffix == ".safetensors"):  # weights last
        os.replace(f, out / f.name)
    _fsync_dir(out)
    tmp.rmdir()


def push_run(out_dir: str | Path, repo_id: str) -> None:
    """Upload the final model, tokenizer, report (as the model card) and metrics to the Hub.

    The token comes from HF_TOKEN in the environment; checkpoints/ and temporary files stay local.
    """
    from huggingface_hub import HfApi

    out = Path(out_dir)
    report = (out / "report.md").read_text() if (out / "report.md").exists() else ""
    (out / "README.md").write_text(
        "---\nlibrary_name: transformers\ntags:\n- rlhf\n- summarization\n- tldr\n---\n\n" + report
    )
    api = HfApi()
    with hub_errors(f"pushing {out} to {repo_id}"):  # the local output stays as it is whatever happens here
        api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(
            folder_path=str(out), repo_id=repo_id, ignore_patterns=["checkpoints/*", "tiny-init/*", ".*", "wandb/*"]
        )
