"""A disk guest's checkpoint: its saved state and its disk overlay, in one file.

The coordinator stores a checkpoint as one blob named by its sha256. A kernel guest's
blob is libvirt's save file as is. A disk guest's writes live in its overlay, which
must travel with the state (restoring the state over another disk would corrupt the
guest), so its blob is an uncompressed tar of exactly two regular files: `state` and
`disk.qcow2`. The two are told apart by content: a libvirt save file starts with
"LibvirtQemudSave", never with a tar header.

A bundle comes from another donor, through the coordinator: reading one accepts
nothing but those two members (no links, no paths, no duplicates, nothing else).

Both members hold the guest's own data (its memory, its disk writes): the bundle and
what it unpacks to are 0600, in a 0700 directory, whatever the umask.
"""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

from donor_app.private_files import open_private, private_dir

STATE_MEMBER = "state"
OVERLAY_MEMBER = "disk.qcow2"


class BundleError(Exception):
    """The checkpoint file is not a bundle this agent can restore; says why."""


def write_bundle(state: Path, overlay: Path, out: Path) -> None:
    """Write `state` and `overlay` into the bundle `out` (replaced if it exists)."""
    with (
        open_private(out) as stream,
        tarfile.open(fileobj=stream, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        tar.add(state, arcname=STATE_MEMBER, recursive=False)
        tar.add(overlay, arcname=OVERLAY_MEMBER, recursive=False)


def is_bundle(path: Path) -> bool:
    return tarfile.is_tarfile(path)


def read_bundle(path: Path, into: Path) -> tuple[Path, Path]:
    """Extract the bundle at `path` into the directory `into` (made if need be):
    (state, overlay). Raises BundleError naming what is wrong."""
    private_dir(into)
    wanted = {STATE_MEMBER: into / STATE_MEMBER, OVERLAY_MEMBER: into / OVERLAY_MEMBER}
    written: set[str] = set()
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                target = wanted.get(member.name)
                if target is None or not member.isreg() or member.name in written:
                    raise BundleError(
                        f"{path}: unexpected member {member.name!r} (a checkpoint bundle holds"
                        f" only the regular files {STATE_MEMBER!r} and {OVERLAY_MEMBER!r})"
                    )
                source = tar.extractfile(member)
                assert source is not None  # a regular file
                with source, open_private(target) as out:
                    shutil.copyfileobj(source, out, 1 << 20)
                written.add(member.name)
    except tarfile.TarError as exc:
        raise BundleError(f"{path}: not a readable checkpoint bundle ({exc})") from exc
    missing = sorted(set(wanted) - written)
    if missing:
        raise BundleError(f"{path}: the checkpoint bundle lacks {', '.join(missing)}")
    return wanted[STATE_MEMBER], wanted[OVERLAY_MEMBER]
