"""Where a compressor checkpoint comes from: a local folder or file, or a Hugging Face hub repo
(``owner/name``, or ``owner/name/file`` for one file of a repo holding several checkpoints, as
ICAE's ``sggetao/icae/mistral_7b_ft_icae.safetensors``), fetched with huggingface_hub's
``snapshot_download`` / ``hf_hub_download`` into the HF cache (``HF_ENDPOINT`` picks a mirror)."""

from __future__ import annotations

import re
from pathlib import Path

from ....errors import UserError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(/.+)?$")


def resolve(path: str) -> Path:
    """A local folder or file for ``path``: as given when it exists here, else downloaded from the hub."""
    local = Path(path).expanduser()
    if local.exists():
        return local
    if not _HUB_ID.match(path) or path.startswith((".", "/", "~")):
        raise UserError(f"soft_compressor: path={path} is neither an existing folder/file nor a hub id "
                        f"(owner/name or owner/name/file). Fix: check the path.")
    from huggingface_hub import errors as hub_errors
    from huggingface_hub import hf_hub_download, snapshot_download

    owner, name, *rest = path.split("/", 2)
    repo = f"{owner}/{name}"
    try:
        if rest:
            return Path(hf_hub_download(repo, rest[0]))
        return Path(snapshot_download(repo))
    except hub_errors.LocalEntryNotFoundError:  # offline (HF_HUB_OFFLINE, no network) and not in the HF cache
        raise UserError(f"soft_compressor: {path} is not in the Hugging Face cache and the hub could not be reached "
                        f"(offline). Fix: download it where there is a network (or unset HF_HUB_OFFLINE), or pass a "
                        f"local folder.") from None
    except (hub_errors.RepositoryNotFoundError, hub_errors.EntryNotFoundError, hub_errors.RevisionNotFoundError) as exc:
        raise UserError(f"soft_compressor: {path} was not found on the hub ({type(exc).__name__}). Fix: check the "
                        f"repo id (and file name), or pass a local folder.") from None
    except (hub_errors.HfHubHTTPError, OSError) as exc:
        raise UserError(f"soft_compressor: could not download {path} from the hub ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:200]}). Fix: check the network / HF_ENDPOINT, or download it "
                        f"and pass the local folder.") from None
