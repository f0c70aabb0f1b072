"""The Hugging Face Hub: check a push target before the work, and turn Hub failures into one line.

Every command that pushes (`--push-to-hub` of the process scripts and of the three stages) checks
its target when it starts: a well-formed repo id, a token (HF_TOKEN, or a stored login) the Hub
accepts, allowed to write in that namespace. A run of hours then never ends in a push that could
not have worked. What can still fail later (the Hub going away mid-upload, a repository someone
else owns) ends with one line naming what to do; the local output is written before any push, so
it is intact either way. The token is only ever read by huggingface_hub from the environment or
its own login file: no message, log or file of ours holds it.
"""

from __future__ import annotations

from contextlib import contextmanager

from .errors import InputError

TOKEN_HINT = "set HF_TOKEN to a Hugging Face token with write access"


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _is_network_error(e: BaseException) -> bool:
    return isinstance(e, (ConnectionError, TimeoutError)) or type(e).__module__.split(".")[0] in (
        "httpx",
        "httpx2",
        "httpcore",
        "httpcore2",
    )


def _explain(action: str, e: BaseException) -> str | None:
    """One line for a Hub failure `e`, or None when `e` is not one."""
    from datasets.exceptions import DatasetNotFoundError
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(e, HfHubHTTPError):
        status = e.response.status_code if e.response is not None else None
        message = (e.server_message or _first_line(e)).strip().splitlines()[0].rstrip(".")
        hint = {
            401: f"the Hub did not accept the token: {TOKEN_HINT}",
            403: "the token may not write there: push to your own namespace, or use a token with write access to it",
            404: "check the name, or set HF_TOKEN for a private or gated repository",
            409: "the name is taken: choose another",
        }.get(status, "try again later")
        return f"{action}: the Hub answered {status} ({message}): {hint}"
    if isinstance(e, DatasetNotFoundError):
        return f"{action}: {_first_line(e)} Check the name, or set HF_TOKEN for a private or gated dataset"
    if isinstance(e, OfflineModeIsEnabled):
        return (
            f"{action}: HF_HUB_OFFLINE=1 is set and it is not in the local cache: "
            "unset HF_HUB_OFFLINE, or pass local files"
        )
    if _is_network_error(e):
        return f"{action}: cannot reach the Hub ({type(e).__name__}: {_first_line(e)}): check the network and try again"
    return None


@contextmanager
def hub_errors(action: str):
    """Re-raise a Hub or network failure of `action` as an InputError: one line with a hint.

    The libraries wrap it (an LFS upload's connection error comes as a RuntimeError "Error while
    uploading ..."), so the chain of causes is searched; anything else propagates unchanged.
    """
    try:
        yield
    except InputError:
        raise  # already one line
    except Exception as e:
        cause = e
        while cause is not None and _explain(action, cause) is None:
            cause = cause.__cause__ or (None if cause.__suppress_context__ else cause.__context__)
        if cause is None:
            raise
        raise InputError(_explain(action, cause)) from None


def check_push_target(repo_id: str) -> None:
    """Stop before any work when a push to `repo_id` cannot succeed: malformed name, no token,
    a token the Hub rejects or that may only read, or a namespace that is not the token's."""
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise InputError(
            f"--push-to-hub {repo_id!r} is not a repository id ({_first_line(e).rstrip('.')}): use NAMESPACE/NAME"
        ) from None
    if get_token() is None:
        raise InputError(f"--push-to-hub {repo_id} needs a token: {TOKEN_HINT}")
    with hub_errors(f"--push-to-hub {repo_id}: checking the token"):
        me = HfApi().whoami()
    if me.get("auth", {}).get("accessToken", {}).get("role") == "read":
        raise InputError(f"--push-to-hub {repo_id}: HF_TOKEN is a read-only token: {TOKEN_HINT}")
    namespaces = [me["name"], *(org["name"] for org in me.get("orgs", []))]
    namespace = repo_id.split("/")[0] if "/" in repo_id else me["name"]
    if namespace not in namespaces:
        raise InputError(
            f"--push-to-hub {repo_id}: the token's user {me['name']} may not create repositories under {namespace!r}: "
            f"push to one of {namespaces}"
        )
