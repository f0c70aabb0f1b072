"""Static checks of the container setup: Dockerfile, .dockerignore and lauch_docker.sh.

No Docker engine is needed: the Dockerfile is parsed, and the launcher is run with `DOCKER` pointing
at a fake client that records its arguments (and at `echo`), so the exact `docker` command line can
be checked, including that secrets travel by name only.
"""

import json
import os
import pty
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
LAUNCHER = REPO / "lauch_docker.sh"  # sic: the name is part of the project's interface
WORKDIR = "/workspace/dgx_spark_summary_from_human_feedback"
CONTAINER_HF_CACHE = "/root/.cache/huggingface"
DEFAULT_IMAGE = "dgx-spark-rlhf:latest"

# TOKEN/KEY/SECRET/PASSWORD as a name part or suffix (HF_TOKEN, WANDB_API_KEY, HFTOKEN), but not
# TOKENIZERS_PARALLELISM, which the image must set.
SECRET_NAME = re.compile(r"(TOKEN|KEY|SECRET|PASSWORD|PASSWD)S?(_|$)", re.IGNORECASE)
# A Hugging Face access token is `hf_` followed by a long run of letters/digits.
HF_TOKEN_LIKE = re.compile(r"\bhf_[A-Za-z0-9]{16,}")
FAKE_HF_TOKEN = "hf_fake_secret"
FAKE_WANDB_KEY = "wandb_fake_secret_0123456789"


# --------------------------------------------------------------------------------------------
# Dockerfile parsing


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; comments dropped, backslash continuations joined.

    Like Docker, comment and blank lines inside a continued instruction are skipped.
    """
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        full = (pending + line).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        instructions.append((word.upper(), rest.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return instructions


def declared_names(instruction: str, args: str) -> list[str]:
    """Variable names declared by an ARG or ENV instruction (both `K=V ...` and legacy `K V`)."""
    if instruction == "ARG":
        return [args.split("=", 1)[0].strip()]
    tokens = shlex.split(args)
    if "=" not in tokens[0]:
        return [tokens[0]]
    return [token.split("=", 1)[0] for token in tokens]


def env_values(instructions) -> dict[str, str]:
    values = {}
    for instruction, args in instructions:
        if instruction == "ENV":
            tokens = shlex.split(args)
            if "=" in tokens[0]:
                values.update(token.split("=", 1) for token in tokens)
            else:
                values[tokens[0]] = " ".join(tokens[1:])
    return values


def pip_install_commands(run_args: str) -> list[list[str]]:
    """Each `pip install ...` in a RUN line, as its argument tokens (up to the next &&, ;, |)."""
    tokens = shlex.split(run_args)
    found = []
    for i, token in enumerate(tokens[:-1]):
        if token.rsplit("/", 1)[-1] in {"pip", "pip3"} and tokens[i + 1] == "install":
            rest = []
            for t in tokens[i + 2 :]:
                if t in {"&&", "||", ";", "|"} or t.endswith(";"):
                    break
                rest.append(t)
            found.append(rest)
    return found


@pytest.fixture(scope="module")
def dockerfile_text() -> str:
    return DOCKERFILE.read_text()


@pytest.fixture(scope="module")
def instructions(dockerfile_text):
    return parse_dockerfile(dockerfile_text)


def test_parser_handles_continuations_and_comments():
    parsed = parse_dockerfile("# c\nFROM x\nRUN a \\\n  # inner comment\n  && b\nENV A=1 B=2\n")
    assert parsed == [("FROM", "x"), ("RUN", "a && b"), ("ENV", "A=1 B=2")]
    assert declared_names("ENV", "A=1 B='x y'") == ["A", "B"]
    assert declared_names("ENV", "LEGACY some value") == ["LEGACY"]
    assert declared_names("ARG", "BASE_IMAGE=nvcr.io/nvidia/pytorch:25.11-py3") == ["BASE_IMAGE"]


@pytest.mark.parametrize(
    "name, secret",
    [
        ("HF_TOKEN", True),
        ("hf_token", True),
        ("HUGGING_FACE_HUB_TOKEN", True),
        ("WANDB_API_KEY", True),
        ("AWS_SECRET_ACCESS_KEY", True),
        ("DB_PASSWORD", True),
        ("HFTOKEN", True),
        ("TOKENIZERS_PARALLELISM", False),
        ("TRITON_PTXAS_PATH", False),
        ("BASE_IMAGE", False),
    ],
)
def test_secret_name_pattern(name, secret):
    assert bool(SECRET_NAME.search(name)) is secret


def test_no_secret_like_arg_or_env(instructions):
    declared = [
        name
        for instruction, args in instructions
        if instruction in {"ARG", "ENV"}
        for name in declared_names(instruction, args)
    ]
    assert "TRITON_PTXAS_PATH" in declared  # the parser did see the ENV lines
    offenders = [name for name in declared if SECRET_NAME.search(name)]
    assert not offenders, f"secret-like build args/env baked into the image: {offenders}"


def test_no_token_or_login_in_container_files():
    for path in (DOCKERFILE, DOCKERIGNORE, LAUNCHER):
        text = path.read_text()
        assert not HF_TOKEN_LIKE.search(text), f"token-looking string in {path.name}"
        assert "huggingface-cli login" not in text and "hf auth login" not in text, path.name
        assert "--secret" not in text, path.name


def test_base_image_is_ngc_pytorch_25_11_or_newer(instructions):
    arg_defaults = {}
    froms = []
    for instruction, args in instructions:
        if instruction == "ARG" and "=" in args and not froms:
            name, default = args.split("=", 1)
            arg_defaults[name.strip()] = default.strip().strip('"')
        elif instruction == "FROM":
            froms.append(args.split()[0])
    assert len(froms) == 1, froms
    image = re.sub(r"\$\{?(\w+)\}?", lambda m: arg_defaults.get(m.group(1), m.group(0)), froms[0])
    match = re.fullmatch(r"nvcr\.io/nvidia/pytorch:(\d{2})\.(\d{2})-py3", image)
    assert match, f"base image is not an NGC PyTorch tag: {image}"
    assert (int(match.group(1)), int(match.group(2))) >= (25, 11), f"{image} predates CUDA 13 / GB10 support"
    assert "BASE_IMAGE" in arg_defaults, "base image should be overridable with --build-arg BASE_IMAGE"


def test_gb10_environment(instructions):
    env = env_values(instructions)
    assert env.get("TRITON_PTXAS_PATH") == "/usr/local/cuda/bin/ptxas"
    assert env.get("HF_HOME") == CONTAINER_HF_CACHE
    assert env.get("PYTHONUNBUFFERED") == "1"
    assert env.get("TOKENIZERS_PARALLELISM") == "false"
    workdirs = [args for instruction, args in instructions if instruction == "WORKDIR"]
    assert workdirs == [WORKDIR]


def test_project_installed_from_pyproject_without_replacing_torch(instructions):
    installs = [
        (index, command)
        for index, (instruction, args) in enumerate(instructions)
        if instruction == "RUN"
        for command in pip_install_commands(args)
    ]
    project = [(i, cmd) for i, cmd in installs if any(t == "." or t.startswith(".[") for t in cmd)]
    assert len(project) == 1, f"expected one `pip install .` of the project, got {installs}"
    install_index, command = project[0]
    assert "--no-build-isolation" in command
    # Nothing installs (or upgrades) torch itself, nor builds Triton.
    for _, cmd in installs:
        assert not any(re.match(r"(torch|triton)\b", t) for t in cmd), cmd
        assert "--upgrade" not in cmd and "-U" not in cmd, cmd

    # A constraint file pinning the image's torch is active before the project install.
    env_before = env_values(instructions[:install_index])
    constraint = env_before.get("PIP_CONSTRAINT")
    assert constraint, "PIP_CONSTRAINT must be set before the project is installed"
    writers = [
        args for instruction, args in instructions[:install_index] if instruction == "RUN" and constraint in args
    ]
    assert writers and any("torch==" in args and "torch" in args for args in writers), (
        "constraint file must pin torch=="
    )


def test_dependency_layer_is_cached_before_full_copy(instructions):
    copies = [(i, args) for i, (instruction, args) in enumerate(instructions) if instruction in {"COPY", "ADD"}]
    assert copies, "no COPY at all"
    pyproject_copy = next(i for i, args in copies if "pyproject.toml" in args.split())
    full_copy = next(i for i, args in copies if args.split()[0] == ".")
    install = next(
        i for i, (instruction, args) in enumerate(instructions) if instruction == "RUN" and pip_install_commands(args)
    )
    assert pyproject_copy < install < full_copy


def test_no_flash_attn_xformers_or_source_builds(instructions):
    # Comments may explain why they are absent; instructions must not use them.
    body = "\n".join(args for _, args in instructions)
    assert not re.search(r"flash[-_]?attn", body, re.IGNORECASE)
    assert "xformers" not in body.lower()
    assert "git clone" not in body


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether docker leaves `path` out of the build context: the last pattern matching the path
    or one of its parent folders wins (`!` re-includes); `*` stays within a path segment, `**`
    spans segments, a leading `/` is the context root (Go's filepath.Match, as docker uses it)."""
    excluded = False
    parts = path.split("/")
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern.lstrip("!").strip("/")
        regex = (
            re.escape(body)
            .replace(r"\*\*/", "\0")
            .replace(r"\*\*", "\1")
            .replace(r"\*", "[^/]*")
            .replace(r"\?", "[^/]")
        )
        regex = regex.replace("\0", "(.*/)?").replace("\1", ".*")  # `**/` also matches no folder at all
        if any(re.fullmatch(regex, "/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            excluded = not negate
    return excluded


def test_dockerignore_matcher():
    patterns = ["out/", "bench/.venv-*", "**/__pycache__", "*.egg-info"]
    assert dockerignored("out/sft/model.safetensors", patterns) and dockerignored("bench/.venv-trl/lib/x.py", patterns)
    assert dockerignored("tests/__pycache__/a.pyc", patterns) and dockerignored("x.egg-info/PKG-INFO", patterns)
    assert not dockerignored("bench/bench_sft.py", patterns) and not dockerignored("tests/out.py", patterns)
    assert not dockerignored("a/x.egg-info/PKG-INFO", patterns)  # no `**/`: the context root only
    assert dockerignored("__pycache__/a.pyc", patterns)  # `**/` matches no folder too


def test_dockerignore_excludes_every_local_build_folder():
    """`COPY . .` must not carry bench/setup.sh's virtual envs (GBs), caches, outputs or anything
    else .gitignore keeps out of the repository."""
    patterns = [
        line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip() and not line.startswith("#")
    ]
    local = [
        ".venv/bin/python",
        "bench/.venv-trl/lib/torch.so",
        "bench/.venv-trl112/bin/python",
        "bench/.cache/hub/x",
        "out/sft/model.safetensors",
        "wandb/run-1/files",
        "build/lib/x.py",
        "data/train.jsonl",
        ".pytest_cache/v",
        "tests/__pycache__/a.pyc",
        ".git/HEAD",
        ".env",
    ]
    for line in (REPO / ".gitignore").read_text().splitlines():
        if line.strip() and not line.startswith(("#", "!")):
            local.append(line.strip().strip("/").replace("**/", "").replace("*", "x") + "/f")  # a file in or under it
    missing = [p for p in local if not dockerignored(p, patterns)]
    assert not missing, f"add to .dockerignore: {missing}"
    for kept in (
        "pyproject.toml",
        "dgx_spark_summary_from_human_feedback/models.py",
        "sft.py",
        "bench/bench_sft.py",
        "README.md",
        "lauch_docker.sh",
    ):
        assert not dockerignored(kept, patterns), kept


def test_dockerignore_excludes_local_state():
    entries = {
        line.strip().rstrip("/")
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for required in (".venv", ".git", "out", "data", "wandb", ".pytest_cache", ".hypothesis"):
        assert required in entries, required
    assert any("__pycache__" in e for e in entries)
    assert any("egg-info" in e for e in entries)
    # The package and pyproject must stay in the build context.
    assert not entries & {"pyproject.toml", "dgx_spark_summary_from_human_feedback", "README.md", "*"}


# --------------------------------------------------------------------------------------------
# Launcher: static checks


@pytest.fixture(scope="module")
def launcher_text() -> str:
    return LAUNCHER.read_text()


def test_launcher_is_executable_bash_that_parses(launcher_text):
    assert LAUNCHER.is_file()
    assert os.access(LAUNCHER, os.X_OK), "chmod +x lauch_docker.sh"
    assert launcher_text.startswith("#!") and "bash" in launcher_text.splitlines()[0]
    assert "set -euo pipefail" in launcher_text
    result = subprocess.run(["bash", "-n", str(LAUNCHER)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_launcher_static_flags(launcher_text):
    assert "docker.sock" not in launcher_text
    assert "--gpus all" in launcher_text
    assert "--ipc=host" in launcher_text
    assert re.search(r"-e\s+HF_TOKEN(\s|$)", launcher_text, re.MULTILINE)
    assert re.search(r"-e\s+WANDB_API_KEY(\s|$)", launcher_text, re.MULTILINE)
    # Never `NAME=value` or `NAME="$NAME"`: that would put the secret on the command line.
    assert not re.search(r"(HF_TOKEN|WANDB_API_KEY)\s*=", launcher_text)
    assert not re.search(r"\$\{?(HF_TOKEN|WANDB_API_KEY)", launcher_text)


# --------------------------------------------------------------------------------------------
# Launcher: argument handling, with a fake docker client

FAKE_DOCKER = """#!@PYTHON@
import json, os, sys
with open(os.environ["FAKE_DOCKER_LOG"], "a") as log:
    log.write(json.dumps({
        "argv": sys.argv[1:],
        "env": {name: os.environ.get(name) for name in ("HF_TOKEN", "WANDB_API_KEY")},
    }) + "\\n")
fail_on = os.environ.get("FAKE_DOCKER_FAIL_ON")
sys.exit(7 if fail_on and sys.argv[1:2] == [fail_on] else 0)
"""


@pytest.fixture
def launch(tmp_path):
    """Run lauch_docker.sh with a fake docker; return (completed process, recorded invocations)."""
    fake = tmp_path / "fake-docker"
    fake.write_text(FAKE_DOCKER.replace("@PYTHON@", sys.executable))
    fake.chmod(0o755)
    log = tmp_path / "docker-calls.jsonl"

    def run(*args, stdin=subprocess.DEVNULL, docker=str(fake), **env_overrides):
        env = {k: v for k, v in os.environ.items() if k not in {"HF_TOKEN", "WANDB_API_KEY", "IMAGE", "BASE_IMAGE"}}
        env.update(
            DOCKER=docker,
            FAKE_DOCKER_LOG=str(log),
            HOME=str(tmp_path / "home"),
            HF_HOME=str(tmp_path / "hf-cache"),
            HF_TOKEN=FAKE_HF_TOKEN,
            WANDB_API_KEY=FAKE_WANDB_KEY,
        )
        for key, value in env_overrides.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        proc = subprocess.run(
            [str(LAUNCHER), *args], stdin=stdin, env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path
        )
        calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        log.unlink(missing_ok=True)
        return proc, calls

    return run


def has_pair(argv: list[str], flag: str, value: str) -> bool:
    return any(argv[i] == flag and argv[i + 1] == value for i in range(len(argv) - 1))


def assert_no_secret(*texts: str):
    for text in texts:
        assert FAKE_HF_TOKEN not in text
        assert FAKE_WANDB_KEY not in text


def test_default_run_command(launch, tmp_path):
    proc, calls = launch()
    assert proc.returncode == 0, proc.stderr
    assert len(calls) == 1, "without --build nothing is built"
    argv = calls[0]["argv"]
    assert argv[0] == "run"
    assert "--rm" in argv
    assert has_pair(argv, "--gpus", "all")
    assert "--ipc=host" in argv
    assert has_pair(argv, "--ulimit", "memlock=-1")
    assert has_pair(argv, "--ulimit", "stack=67108864")
    assert has_pair(argv, "-v", f"{REPO}:{WORKDIR}")
    assert has_pair(argv, "-v", f"{tmp_path / 'hf-cache'}:{CONTAINER_HF_CACHE}")
    assert (tmp_path / "hf-cache").is_dir(), "the host cache dir should be created before mounting"
    assert has_pair(argv, "-e", "HF_TOKEN")
    assert has_pair(argv, "-e", "WANDB_API_KEY")
    assert "--network" not in argv and "--net=host" not in argv and "--privileged" not in argv
    assert argv[-2:] == [DEFAULT_IMAGE, "bash"]
    assert not any("docker.sock" in a for a in argv)
    assert_no_secret(*argv, proc.stdout, proc.stderr)


def test_secrets_reach_docker_through_the_environment_only(launch):
    proc, calls = launch()
    assert proc.returncode == 0, proc.stderr
    # `-e HF_TOKEN` makes docker read the value from its own environment at run time.
    assert calls[0]["env"] == {"HF_TOKEN": FAKE_HF_TOKEN, "WANDB_API_KEY": FAKE_WANDB_KEY}
    assert not any(a.startswith(("HF_TOKEN=", "WANDB_API_KEY=")) for a in calls[0]["argv"])
    assert_no_secret(*calls[0]["argv"])


def test_printed_command_line_with_echo_has_no_secret(launch, tmp_path):
    proc, calls = launch("python", "-V", docker="echo")
    assert proc.returncode == 0, proc.stderr
    assert calls == []
    printed = proc.stdout
    assert printed.startswith("run ")
    for fragment in ("--gpus all", "--ipc=host", "-e HF_TOKEN ", "-e WANDB_API_KEY ", f"{REPO}:{WORKDIR}"):
        assert fragment in printed, fragment
    assert printed.rstrip().endswith(f"{DEFAULT_IMAGE} python -V")
    assert_no_secret(printed, proc.stderr)


def test_hf_cache_defaults_to_home_cache(launch, tmp_path):
    proc, calls = launch(HF_HOME=None)
    assert proc.returncode == 0, proc.stderr
    host_cache = tmp_path / "home" / ".cache" / "huggingface"
    assert has_pair(calls[0]["argv"], "-v", f"{host_cache}:{CONTAINER_HF_CACHE}")


@pytest.mark.parametrize(
    "args, expected_command",
    [
        ((), ["bash"]),
        (("python", "-m", "pkg.train", "--lr", "1e-5", "a b"), ["python", "-m", "pkg.train", "--lr", "1e-5", "a b"]),
        (("--", "--build"), ["--build"]),
        (("--host-net", "torchrun", "--nnodes", "2"), ["torchrun", "--nnodes", "2"]),
    ],
)
def test_command_passthrough(launch, args, expected_command):
    proc, calls = launch(*args)
    assert proc.returncode == 0, proc.stderr
    assert [c["argv"][0] for c in calls] == ["run"]
    argv = calls[0]["argv"]
    image_at = argv.index(DEFAULT_IMAGE)
    assert argv[image_at + 1 :] == expected_command


def test_host_net_flag(launch):
    _, plain = launch()
    proc, calls = launch("--host-net")
    assert proc.returncode == 0, proc.stderr
    argv = calls[0]["argv"]
    assert has_pair(argv, "--network", "host")
    assert not has_pair(plain[0]["argv"], "--network", "host")
    # Still the same GPU / memory settings.
    assert has_pair(argv, "--gpus", "all") and "--ipc=host" in argv
    # the interface settings of both backends (NCCL on GPUs, gloo for CPU collectives) by name
    for name in ("NCCL_SOCKET_IFNAME", "NCCL_IB_HCA", "GLOO_SOCKET_IFNAME"):
        assert has_pair(argv, "-e", name), name


def test_build_flag_builds_then_runs_custom_image(launch):
    proc, calls = launch("--build", "nvidia-smi", IMAGE="my/rlhf:dev", BASE_IMAGE="nvcr.io/nvidia/pytorch:26.01-py3")
    assert proc.returncode == 0, proc.stderr
    assert [c["argv"][0] for c in calls] == ["build", "run"]
    build = calls[0]["argv"]
    assert has_pair(build, "-t", "my/rlhf:dev")
    assert build[-1] == str(REPO)
    assert has_pair(build, "--build-arg", "BASE_IMAGE=nvcr.io/nvidia/pytorch:26.01-py3")
    assert_no_secret(*build)
    assert calls[1]["argv"][-2:] == ["my/rlhf:dev", "nvidia-smi"]


def test_failed_build_does_not_run(launch):
    proc, calls = launch("--build", FAKE_DOCKER_FAIL_ON="build")
    assert proc.returncode != 0
    assert [c["argv"][0] for c in calls] == ["build"]


def test_docker_exit_status_is_propagated(launch):
    proc, _ = launch(FAKE_DOCKER_FAIL_ON="run")
    assert proc.returncode == 7


def test_tty_flags_follow_stdin(launch):
    _, calls = launch()
    assert "-i" in calls[0]["argv"] and "-it" not in calls[0]["argv"], "no terminal: docker would reject -t"
    leader, follower = pty.openpty()
    try:
        proc, calls = launch(stdin=follower)
    finally:
        os.close(leader)
        os.close(follower)
    assert proc.returncode == 0, proc.stderr
    assert "-it" in calls[0]["argv"]
