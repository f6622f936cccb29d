"""What the Admin API shows an administrator beside the records: a donor as it is now
(connected or not, the workloads it holds) and an enrollment token just made.

Plain frozen dataclasses; `donor_app.proto.admin_replies` builds them from the
coordinator's replies. Times are aware UTC datetimes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from donor_app.domain.link import Capacity


@dataclass(frozen=True, slots=True)
class DonorView:
    """An enrolled donor as the coordinator sees it now. `capacity` and `last_seen` are
    None until it has reported; `workload_ids` are the workloads it holds."""

    donor_id: str
    hostname: str
    connected: bool = False
    drained: bool = False
    revoked: bool = False
    lost: bool = False
    capacity: Capacity | None = None
    enrolled_at: datetime | None = None
    last_seen: datetime | None = None
    workload_ids: tuple[str, ...] = ()

    @property
    def flags(self) -> tuple[str, ...]:
        """ "revoked", "drained", "lost": those that apply, in that order."""
        return tuple(
            name
            for name, on in (
                ("revoked", self.revoked),
                ("drained", self.drained),
                ("lost", self.lost),
            )
            if on
        )


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """An enrollment token as made: the text to hand out (shown once; left out of
    `repr` so that logging the object never leaks it), its expiry and its uses."""

    token: str = field(repr=False)
    expires_at: datetime
    uses: int
