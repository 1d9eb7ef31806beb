"""One file of a Hugging Face hub *dataset* repository, fetched with ``huggingface_hub``'s own client
(``hf_hub_download``) into the HF cache (``$HF_HOME/hub``, default ``~/.cache/huggingface/hub``;
``HF_ENDPOINT`` picks a mirror), at a pinned revision.

With a full 40-hex commit as the revision, a file already in the cache is returned without any
network call (``hf_hub_download`` short-cuts pinned commits), so a second run works offline with
nothing set; ``HF_HUB_OFFLINE=1`` only makes that explicit. Every failure becomes a
:class:`~lcbench.errors.UserError` naming its real cause — the revision or file does not exist,
the repository is missing or gated, the endpoint is unreachable and the cache has no copy, or the
endpoint does not answer like the hub — and the fix, including the local alternative ``fix_local``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError


@dataclass(frozen=True)
class HubFile:
    """Where one released file lives on the hub."""

    repo: str
    filename: str
    revision: str

    @property
    def url(self) -> str:
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
        return f"{endpoint}/datasets/{self.repo}/resolve/{self.revision}/{self.filename}"


def hf_cache_dir() -> str:
    """The HF hub cache folder huggingface_hub uses (``HF_HUB_CACHE`` / ``HF_HOME``)."""
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def download(file: HubFile, what: str, fix_local: str) -> Path:
    """The local path of ``file`` (downloaded on first use, then from the HF cache)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub import errors as hub_errors

    where = f"{file.repo}@{file.revision}:{file.filename}"
    try:
        return Path(hf_hub_download(file.repo, file.filename, repo_type="dataset", revision=file.revision))
    except hub_errors.RevisionNotFoundError:
        raise UserError(f"{what}: revision '{file.revision}' does not exist in the hub dataset '{file.repo}' "
                        f"({file.url}). Fix: pass an existing commit or branch with --task-args "
                        f"revision=<commit> (e.g. revision=main), or {fix_local}.") from None
    except hub_errors.GatedRepoError:
        raise UserError(f"{what}: the hub dataset '{file.repo}' is gated and this machine has no accepted access "
                        f"token. Fix: accept its terms on the hub and run `hf auth login`, or {fix_local}.") from None
    except hub_errors.RepositoryNotFoundError:
        raise UserError(f"{what}: the hub dataset '{file.repo}' was not found at {file.url} (renamed, private, or "
                        f"HF_ENDPOINT points at a mirror without it). Fix: check HF_ENDPOINT, or {fix_local}.") from None
    except hub_errors.EntryNotFoundError as exc:
        if isinstance(exc, hub_errors.LocalEntryNotFoundError):
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, hub_errors.FileMetadataError):
                raise UserError(f"{what}: {file.url} did not answer like the Hugging Face hub ({cause}). Fix: "
                                f"unset HF_ENDPOINT or point it at a hub mirror, or {fix_local}.") from None
            offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
            reason = ("HF_HUB_OFFLINE is set" if offline else
                      f"the hub could not be reached ({type(cause).__name__ if cause else 'no connection'})")
            raise UserError(f"{what}: {where} is not in the HF cache ({hf_cache_dir()}) and {reason}. Fix: run "
                            f"once with network access to {file.url} (it is cached for later offline runs), "
                            f"or {fix_local}.") from None
        raise UserError(f"{what}: the hub dataset '{file.repo}' has no file '{file.filename}' at revision "
                        f"'{file.revision}'. Fix: pass a revision that has it (--task-args revision=<commit>), "
                        f"or {fix_local}.") from None
    except hub_errors.HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", "?")
        raise UserError(f"{what}: the hub answered HTTP {status} for {file.url}. Fix: retry later, or "
                        f"{fix_local}.") from None
    except OSError as exc:  # a full disk or an unwritable cache folder
        raise UserError(f"{what}: could not write {where} into the HF cache ({hf_cache_dir()}): {exc}. Fix: free "
                        f"space or set HF_HOME to a writable folder, or {fix_local}.") from None


def datasets_error_cause(exc: Exception) -> str:
    """What an exception of ``datasets.load_dataset`` on a hub dataset means, in words."""
    from datasets.exceptions import DatasetNotFoundError

    name = type(exc).__name__
    if isinstance(exc, DatasetNotFoundError):
        return "the dataset was not found on the hub (renamed, gated, or HF_ENDPOINT points at a mirror without it)"
    if isinstance(exc, (ConnectionError, TimeoutError)) or name in ("LocalEntryNotFoundError", "ConnectError",
                                                                     "ConnectTimeout", "OfflineModeIsEnabled"):
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or os.environ.get("HF_DATASETS_OFFLINE", "") \
            not in ("", "0")
        why = "HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set" if offline else "the hub could not be reached"
        return f"{why} and the HF cache ({hf_cache_dir()}) has no copy"
    first = str(exc).splitlines()[0] if str(exc) else ""
    return f"{name}: {first}"[:300]
