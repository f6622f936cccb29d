"""donor_app: workstations lend idle CPU and RAM to sandboxed guest VMs, owner first."""

import os as _os

__version__ = "0.1.0"

# gRPC's fork handlers restart its poller threads in a forked child. libvirt (the
# embedded QEMU driver runs inside the agent) forks and closes every descriptor before
# exec'ing QEMU, so a restarted poller hits EBADF and aborts the child: guests fail to
# start. Nothing here forks to run gRPC in a child, so the handlers are not wanted. This
# must be set before grpc is imported, hence here, the first module any entry loads.
_os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
