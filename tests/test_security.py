"""Security: no remote code, safetensors only, weights_only loads, secrets never written."""

import ast
import os
import subprocess
import sys

import pytest

from .conftest import REPO

SOURCES = sorted(
    [
        *REPO.glob("*.py"),
        *(REPO / "dgx_spark_summary_from_human_feedback").rglob("*.py"),
        *(REPO / "bench").glob("*.py"),
    ]
)


def calls(path, name):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if called == name:
                yield node


def test_sources_are_found():
    names = {p.name for p in SOURCES}
    assert {"sft.py", "reward.py", "ppo.py", "models.py", "checkpoint.py"} <= names


def test_no_trust_remote_code_anywhere():
    offenders = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.keyword)
                and node.arg == "trust_remote_code"
                and not (isinstance(node.value, ast.Constant) and node.value.value is False)
            ):
                offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []


def torch_load_calls(tree):
    """Calls of torch.load under any spelling: `torch.load`, `import torch as t; t.load`,
    `from torch import load [as f]; f(...)`, `torch.serialization.load`."""
    modules, functions = {"torch"}, set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {a.asname or a.name for a in node.names if a.name in ("torch", "torch.serialization")}
        elif isinstance(node, ast.ImportFrom) and node.module in ("torch", "torch.serialization"):
            functions |= {a.asname or a.name for a in node.names if a.name == "load"}
            modules |= {a.asname or a.name for a in node.names if a.name == "serialization"}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id in functions:
            yield node
        elif (
            isinstance(func, ast.Attribute)
            and func.attr == "load"
            and ast.unparse(func.value) in modules | {"torch.serialization"}
        ):
            yield node


def test_torch_load_calls_are_found_under_every_spelling():
    source = "import torch\nimport torch as t\nfrom torch import load\nfrom torch import load as f\nfrom torch import serialization\n"
    source += (
        "torch.load(p)\nt.load(p)\nload(p)\nf(p)\nserialization.load(p)\ntorch.serialization.load(p)\njson.load(p)\n"
    )
    assert len(list(torch_load_calls(ast.parse(source)))) == 6


def test_every_torch_load_is_weights_only():
    offenders = []
    for path in SOURCES:
        for node in torch_load_calls(ast.parse(path.read_text(), filename=str(path))):
            kw = {k.arg: k.value for k in node.keywords}
            if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []


def test_no_pickle_based_model_saving():
    offenders = []
    for path in SOURCES:
        for node in calls(path, "save_pretrained"):
            kw = {k.arg: k.value for k in node.keywords}
            if "safe_serialization" in kw and not (
                isinstance(kw["safe_serialization"], ast.Constant) and kw["safe_serialization"].value is True
            ):
                offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []
    assert "import pickle" not in "".join(p.read_text() for p in SOURCES)


@pytest.mark.slow
def test_secrets_from_the_environment_never_reach_outputs(tmp_path):
    secrets = {
        "HF_TOKEN": "hf_FAKEsecret0123456789",
        "WANDB_API_KEY": "wandbFAKEsecret0123456789",
        "OPENAI_API_KEY": "sk-FAKEsecret0123456789",
    }
    env = {**os.environ, **secrets, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    out = tmp_path / "sft"
    result = subprocess.run(
        [
            sys.executable,
            "sft.py",
            "--preset",
            "smoke",
            "--max-steps",
            "4",
            "--eval-interval",
            "2",
            "--num-eval-samples",
            "2",
            "--wandb-project",
            "secret-test",
            "--output-dir",
            str(out),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) > 10 and any(p.suffix == ".wandb" for p in files)  # wandb's offline run is in there too
    for value in secrets.values():
        assert value not in result.stdout + result.stderr
        for path in files:
            assert value.encode() not in path.read_bytes(), f"{value[:6]}... found in {path}"
    assert not [p for p in files if p.suffix in (".bin", ".pkl", ".pt") and p.name != "training_state.pt"]
