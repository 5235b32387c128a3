r"""DALI's pipeline errors as :class:`DataError`\ s that name the image (or shard) at fault and the fix."""

from __future__ import annotations

import re
from collections.abc import Sequence

from pipeline.data.errors import DataError
from pipeline.data.folder import is_url
from pipeline.data.sniff import quick_scan


def explain_pipeline_error(error: BaseException, *, files: Sequence[str], root: str) -> DataError:
    """Turn a DALI pipeline error into a DataError that names the image at fault and the fix.

    DALI 2.4 names the file for some failures ("Failed to decode sample #1 : <path>", "S3 Object not
    found. bucket=B object=K") and not for others ("nvImageCodec failure: '#4'" for bytes that are no
    image at all, or an empty file or S3 object). In the second case
    the split's files are checked quickly (size and leading bytes, see
    :func:`pipeline.data.sniff.quick_scan`) to find the culprit.
    """
    text = str(error)
    reason = dali_reason(text)
    fix = (
        f"find every such file with `python -m pipeline.tools.validate {root} --write-list bad.txt` and set "
        f"--data.exclude_list=bad.txt (or replace the file)"
    )
    path = _named_file(text, files)
    if path is not None:
        return DataError(f"{path}: DALI cannot read or decode this image ({reason}); {fix}")
    remote = any(is_url(f) for f in files[:1])
    low = text.lower()
    if (
        remote
        and "s3" in low
        and any(
            w in low
            for w in ("not supported", "unsupported", "not compiled", "unknown scheme", "no filesystem", "not built")
        )
    ):
        return DataError(
            f"this DALI build cannot read s3:// URLs ({reason}); copy the dataset to a local or "
            f"node-local folder (e.g. `aws s3 sync {root} /local/imagenet`) and set --data.root to it, "
            f"or install a DALI wheel with S3 support (nvidia-dali-cuda* >= 1.41)"
        )
    if remote and any(
        w in low
        for w in ("curl", "timeout", "could not connect", "connection", "credentials", "access denied", "forbidden")
    ):
        return DataError(
            f"DALI cannot read {root} from object storage ({reason}); check AWS_ENDPOINT_URL, "
            f"AWS_REGION and the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE)"
        )
    suspects = quick_scan(files, time_budget_s=120.0)
    if suspects:
        shown = "; ".join(f"{p}: {why}" for p, why in suspects[:5]) + ("; ..." if len(suspects) > 5 else "")
        return DataError(
            f"DALI failed on an image it did not name ({reason}); these files are not valid images: {shown}; {fix}"
        )
    return DataError(
        f"DALI failed while reading {root} ({reason}) without naming a file, and a quick check of the "
        f"{len(files)} files found nothing; {fix}"
    )


def dali_reason(text: str) -> str:
    """The failing operator's own words in DALI's error ``text``: at most two lines, 300 characters."""
    # DALI's message: a traceback of the graph, then "encountered:" and the operator's own words.
    body = text.split("encountered:", 1)[1] if "encountered:" in text else text
    lines = [
        ln.strip()
        for ln in body.splitlines()
        if ln.strip() and "no longer valid" not in ln and not ln.strip().startswith("C++ context")
    ]
    return " ".join(lines[:2])[:300] or text[:300]


def _named_file(text: str, files: Sequence[str]) -> str | None:
    m = re.search(r"bucket=(\S+) object=(\S+?):?\s", text + " ")
    if m:
        return f"s3://{m.group(1)}/{m.group(2)}"
    known = set(files)
    for token in re.findall(r"[^\s'\"`]+", text):
        token = token.rstrip(".,:;)")
        if token in known:
            return token
    return None
