"""Finding a model folder on disk or on the Hugging Face Hub, and uploading one.

``resolve_folder(name, ...)`` is what ``from_pretrained``, ``load_pretrained``
and ``pyvq.convert.from_diffusers`` call with their ``name`` argument:

1. a local directory that exists wins (``subfolder`` is joined to it);
2. otherwise ``name`` must be a Hub repository id (``"owner/name"`` or
   ``"name"``); the files are looked up in the local Hugging Face cache first
   (``huggingface_hub.snapshot_download(local_files_only=True)``), so a cached
   model loads without any network call;
3. only when the cache lacks them, and downloads are allowed
   (``local_files_only=False`` and ``HF_HUB_OFFLINE`` unset, read at call
   time), are they downloaded into that cache;
4. otherwise one ``FileNotFoundError`` names the repository, the revision and
   the files, and says how to get them onto this machine.

A cached revision is used as it is (no check for newer commits on the Hub);
pass ``force_download=True`` (or an exact commit as ``revision``) to refresh.

``upload_folder(folder, repo_id, files, ...)`` creates the repository
(``exist_ok``) and uploads the named files of ``folder`` in one commit.

huggingface_hub is imported only when the Hub is used; a local directory
never needs it.
"""

from __future__ import annotations

import fnmatch
import os
import sys
import warnings
from collections.abc import Sequence

__all__ = ["check_repo_id", "hub_offline", "is_repo_id", "resolve_folder", "upload_folder"]

_TRUE = {"1", "on", "yes", "true"}


def hub_offline() -> bool:
    """Whether Hub downloads are off: ``HF_HUB_OFFLINE`` (or
    ``TRANSFORMERS_OFFLINE``) set now, or when huggingface_hub was imported."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(constants.is_offline_mode())


def is_repo_id(name: str) -> bool:
    """Whether ``name`` is a valid Hub model id (``"owner/name"`` or ``"name"``)."""
    try:
        from huggingface_hub.utils import validate_repo_id
    except ImportError:
        return False
    try:
        validate_repo_id(name)
    except Exception:  # HFValidationError: not an id (a path with several parts, '..', ...)
        return False
    return True


def check_repo_id(repo_id, what: str) -> str:
    """``repo_id`` if it is a Hub repository id, else ``ValueError`` naming it."""
    if not isinstance(repo_id, str) or not is_repo_id(repo_id):
        raise ValueError(
            f"{what}: argument 'repo_id' must be a Hub repository id 'owner/name' or 'name', got {repo_id!r}"
        )
    return repo_id


def _outside_pyvq() -> int:
    # For warnings.warn in the calling function: the stacklevel of the first frame outside pyvq.
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    level, frame = 1, sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(package):
        level, frame = level + 1, frame.f_back
    return level


def _present(base: str, pattern: str) -> bool:
    # A file under base matches pattern (a path relative to base, may hold wildcards).
    if not any(c in pattern for c in "*?["):
        return os.path.isfile(os.path.join(base, pattern))
    head, tail = os.path.split(pattern)
    folder = os.path.join(base, head)
    return os.path.isdir(folder) and any(
        fnmatch.fnmatch(f, tail) and os.path.isfile(os.path.join(folder, f)) for f in os.listdir(folder)
    )


def _complete(base: str, required: Sequence[str], choices: Sequence[Sequence[str]]) -> bool:
    if not all(_present(base, f) for f in required):
        return False
    return not choices or any(all(_present(base, p) for p in group) for group in choices)


def _describe(repo_id: str, revision: str | None, subfolder: str | None) -> str:
    text = f"there is no directory {repo_id!r}, and the Hugging Face Hub repository {repo_id!r} (revision {revision or 'main'!r}"
    return text + (f", subfolder {subfolder!r})" if subfolder else ")")


def resolve_folder(
    name: str | os.PathLike,
    *,
    what: str,
    required: Sequence[str],
    choices: Sequence[Sequence[str]] = (),
    revision: str | None = None,
    subfolder: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    force_download: bool = False,
) -> str:
    """The local folder holding a model named ``name`` (a directory or a Hub id).

    Args:
        name: a local directory, or a Hub repository id.
        what: the caller, for messages (``"VQGAN.from_pretrained"``).
        required: file names (relative to ``subfolder``, at least one) that
            must all exist.
        choices: groups of file patterns (relative to ``subfolder``, ``*``
            allowed), in order of preference; when given, every pattern of
            one group must match. Only the first group the repository has is
            downloaded (e.g. safetensors before ``.bin``).
        revision: branch, tag or commit of a Hub repository (default ``main``).
        subfolder: a folder inside the directory or repository.
        cache_dir: the Hugging Face cache (default: ``HF_HUB_CACHE``, i.e.
            ``$HF_HOME/hub``).
        local_files_only: never download; use the cache only.
        token: a Hub token for private or gated repositories.
        force_download: skip the cache and download again.

    Returns:
        The folder (``subfolder`` included). For a local directory the files
        are not checked here: the caller's reader names a missing one.

    Raises:
        FileNotFoundError: ``name`` is neither an existing directory nor a Hub
            id; the repository, revision or files are not available (named,
            with how to get them).
    """
    path = os.fspath(name)
    if subfolder is not None and not isinstance(subfolder, str):
        raise TypeError(f"{what}: argument 'subfolder' must be a str or None, got {type(subfolder).__name__}")
    subfolder = (subfolder.strip("/") or None) if subfolder else None
    if os.path.isdir(path):
        ignored = [k for k, v in (("revision", revision), ("cache_dir", cache_dir)) if v is not None]
        if ignored:
            warnings.warn(
                f"{what}: {path!r} is a local directory, so {' and '.join(ignored)} (Hub options) are ignored",
                stacklevel=_outside_pyvq(),
            )
        return os.path.join(path, subfolder) if subfolder else path
    if not isinstance(name, str) or not is_repo_id(path):
        raise FileNotFoundError(f"{what}: no such directory {path!r} (nor is it a Hub repository id 'owner/name')")

    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    import pyvq

    prefix = f"{subfolder}/" if subfolder else ""
    where = _describe(path, revision, subfolder)
    cache = os.fspath(cache_dir) if cache_dir is not None else constants.HF_HUB_CACHE
    groups = [list(g) for g in choices] or [[]]
    common = dict(
        repo_id=path, revision=revision, cache_dir=cache_dir, token=token,
        library_name="pyvq", library_version=pyvq.__version__,
    )

    def folder_of(snapshot: str) -> str | None:
        base = os.path.join(snapshot, subfolder) if subfolder else snapshot
        return base if _complete(base, required, choices) else None

    # 1. The cache, without any network call.
    detail = "it is not in the cache"
    if force_download:
        detail = "force_download=True skips the cache"
    else:
        try:
            snapshot = huggingface_hub.snapshot_download(
                local_files_only=True, allow_patterns=[prefix + f for f in required], **common
            )
        except IncompleteSnapshotError as exc:  # an interrupted download
            detail = f"its cached snapshot {exc.snapshot_path} is incomplete"
        except LocalEntryNotFoundError:
            pass
        else:
            found = folder_of(snapshot)
            if found is not None:
                return found
            detail = f"its cached snapshot {snapshot} lacks some of the files"

    offline = local_files_only or hub_offline()
    files = [prefix + f for f in (*required, *groups[0])]
    if offline:
        why = "local_files_only=True" if local_files_only else "HF_HUB_OFFLINE is set"
        rev = f" --revision {revision}" if revision else ""
        raise FileNotFoundError(
            f"{what}: {where} cannot be used: downloads are off ({why}) and {detail}. Needed files: "
            f"{files if len(groups) == 1 else [*files, '...']}. On a machine with network access run\n"
            f"    hf download {path} {' '.join(files)}{rev}\n"
            "(huggingface-cli download with older huggingface_hub; --cache-dir <folder> to choose the cache) "
            "and copy that cache folder to this machine; then pass it as cache_dir=, or set HF_HUB_CACHE "
            f"(or HF_HOME, whose hub/ it is) before starting Python. Cache searched: {cache}"
        )

    # 2. The Hub: required files plus the first group of choices the repository has.
    for group in groups:
        try:
            snapshot = huggingface_hub.snapshot_download(
                allow_patterns=[prefix + f for f in (*required, *group)],
                force_download=force_download, **common,
            )
        except (RepositoryNotFoundError, GatedRepoError) as exc:
            raise FileNotFoundError(
                f"{what}: {where} cannot be read: no such repository, or it is private or gated and "
                f"token= (or `hf auth login`) does not grant access ({' '.join(str(exc).split())})"
            ) from exc
        except RevisionNotFoundError as exc:
            raise FileNotFoundError(f"{what}: {where}: the repository has no such revision") from exc
        except LocalEntryNotFoundError as exc:  # the Hub was unreachable and the cache lacks the files
            raise FileNotFoundError(
                f"{what}: {where} could not be downloaded ({' '.join(str(exc).split())}), and the cache at "
                f"{cache} lacks it"
            ) from exc
        found = folder_of(snapshot)
        if found is not None:
            return found
    wanted = list(required) + (["one of " + " / ".join("+".join(g) for g in groups)] if choices else [])
    raise FileNotFoundError(f"{what}: {where} lacks the expected files; needed: {wanted}")


def upload_folder(
    folder: str | os.PathLike,
    repo_id: str,
    files: Sequence[str],
    *,
    what: str,
    commit_message: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
):
    """Create ``repo_id`` on the Hub if needed and upload ``files`` of ``folder``.

    ``revision`` is a branch, created when missing. Returns huggingface_hub's
    ``CommitInfo``. Errors from the Hub are raised as they are, with a note
    that the files are kept in ``folder``.
    """
    check_repo_id(repo_id, what)
    from huggingface_hub import HfApi

    import pyvq

    try:
        api = HfApi(token=token, library_name="pyvq", library_version=pyvq.__version__)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if revision is not None and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=os.fspath(folder),
            allow_patterns=list(files),
            commit_message=commit_message or "Upload with pyvq",
            revision=revision,
            create_pr=create_pr,
        )
    except Exception as exc:
        exc.add_note(f"pyvq: the upload to {repo_id!r} failed; the files are kept in {os.fspath(folder)!r}")
        raise
