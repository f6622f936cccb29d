"""The one error type the rest of the project sees from the hypervisor layer."""

from __future__ import annotations


class HypervisorError(Exception):
    """An operation on a guest failed; names the operation and the guest.

    `code` is libvirt's error code when libvirt raised it (None otherwise), so callers can
    tell "the guest is gone" (`not_found`) from other failures without importing libvirt.
    """

    def __init__(
        self, operation: str, guest: str | None, detail: str, code: int | None = None
    ) -> None:
        self.operation = operation
        self.guest = guest
        self.detail = detail
        self.code = code
        self.not_found = False
        target = f" guest {guest!r}" if guest else ""
        super().__init__(f"{operation}{target}: {detail}")


class ImageError(HypervisorError):
    """An image is missing from the cache or its content does not match its sha256."""

    def __init__(self, sha256: str, detail: str, guest: str | None = None) -> None:
        super().__init__("image", guest, f"{sha256}: {detail}")
        self.sha256 = sha256
        self.reason = detail

    def for_guest(self, guest: str) -> ImageError:
        """The same error, naming the guest whose image it is."""
        return ImageError(self.sha256, self.reason, guest)
