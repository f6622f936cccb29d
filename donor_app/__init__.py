"""donor_app: workstations lend idle CPU and RAM to sandboxed guest VMs, owner first."""

__version__ = "0.1.0"
