"""coordinator.proto ↔ domain for the donor link: what donors and the coordinator say.

Everything coming off the wire is validated here; a bad field raises `WireError` whose
message starts with the field's path ("hello.capacity.cores: ..."), which the servicer
returns as INVALID_ARGUMENT. Workload specs are converted by `spec_serde`, the admin
API's views by `admin_serde`.
"""

from __future__ import annotations

from collections.abc import Sequence

from donor_app.domain import link
from donor_app.domain.decision import Level
from donor_app.domain.guest import GuestState
from donor_app.domain.vm import ARCHES, SHA256_PATTERN
from donor_app.proto.checks import WireError, identifier, optional_time, text, time_at
from donor_app.proto.serde import timestamp
from donor_app.proto.spec_serde import spec_from_proto, spec_to_proto
from donor_app.proto.v1 import coordinator_pb2 as pb

MAX_CORES = 4096
MAX_MEMORY_MIB = 64 * 1024 * 1024  # 64 TiB


# --- capacity ----------------------------------------------------------------------------


def capacity_to_proto(capacity: link.Capacity) -> pb.Capacity:
    message = pb.Capacity(
        cores=capacity.cores,
        memory_mib=capacity.memory_mib,
        arch=capacity.arch,
        lend_cpu_percent=capacity.lend_cpu_percent,
        lend_memory_mib=capacity.lend_memory_mib,
        idle=capacity.idle,
    )
    if capacity.lend_until is not None:
        message.lend_until.CopyFrom(timestamp(capacity.lend_until))
    return message


def capacity_from_proto(message: pb.Capacity, path: str = "capacity") -> link.Capacity:
    if not 1 <= message.cores <= MAX_CORES:
        raise WireError(f"{path}.cores: {message.cores} is outside 1–{MAX_CORES}")
    if not 1 <= message.memory_mib <= MAX_MEMORY_MIB:
        raise WireError(f"{path}.memory_mib: {message.memory_mib} is outside 1–{MAX_MEMORY_MIB}")
    if message.arch not in ARCHES:
        raise WireError(f"{path}.arch: {message.arch[:40]!r} is not one of {', '.join(ARCHES)}")
    if not 0.0 <= message.lend_cpu_percent <= 100.0:
        raise WireError(f"{path}.lend_cpu_percent: {message.lend_cpu_percent} is outside 0–100")
    if message.lend_memory_mib > message.memory_mib:
        raise WireError(
            f"{path}.lend_memory_mib: {message.lend_memory_mib} is more than the donor's"
            f" {message.memory_mib} MiB"
        )
    return link.Capacity(
        cores=message.cores,
        memory_mib=message.memory_mib,
        arch=message.arch,
        lend_cpu_percent=message.lend_cpu_percent,
        lend_memory_mib=message.lend_memory_mib,
        lend_until=optional_time(path, message, "lend_until"),
        idle=message.idle,
    )


# --- guests --------------------------------------------------------------------------------

_GUEST_STATES_BACK = {
    pb.GUEST_STATE_STARTING: GuestState.STARTING,
    pb.GUEST_STATE_RUNNING: GuestState.RUNNING,
    pb.GUEST_STATE_PAUSED: GuestState.PAUSED,
    pb.GUEST_STATE_CHECKPOINTED: GuestState.CHECKPOINTED,
    pb.GUEST_STATE_STOPPED: GuestState.STOPPED,
    pb.GUEST_STATE_FAILED: GuestState.FAILED,
}
_GUEST_STATES = {state: wire for wire, state in _GUEST_STATES_BACK.items()}
# A state the hypervisor cannot tell is nothing the coordinator could act on.
_GUEST_STATES[GuestState.OTHER] = pb.GUEST_STATE_FAILED


def guest_to_proto(guest: link.GuestReport) -> pb.GuestReport:
    return pb.GuestReport(
        workload_id=guest.workload_id,
        epoch=guest.epoch,
        state=_GUEST_STATES[guest.state],
        detail=guest.detail[: link.MAX_TEXT],
    )


def guests_from_proto(
    messages: Sequence[pb.GuestReport], path: str
) -> tuple[link.GuestReport, ...]:
    if len(messages) > link.MAX_GUESTS_PER_REPORT:
        raise WireError(f"{path}: more than {link.MAX_GUESTS_PER_REPORT} guests")
    guests = []
    seen: set[str] = set()
    for index, message in enumerate(messages):
        where = f"{path}[{index}]"
        workload_id = identifier(f"{where}.workload_id", message.workload_id)
        if workload_id in seen:
            raise WireError(f"{where}.workload_id: {workload_id} is reported twice")
        seen.add(workload_id)
        state = _GUEST_STATES_BACK.get(message.state)
        if state is None:
            raise WireError(f"{where}.state: {message.state} is not a known guest state")
        guests.append(
            link.GuestReport(
                workload_id=workload_id,
                epoch=message.epoch,
                state=state,
                detail=text(f"{where}.detail", message.detail),
            )
        )
    return tuple(guests)


def level_to_wire(level: Level | None) -> str:
    """A donor's policy level as Report.level carries it: its word, "" for none yet."""
    return "" if level is None else Level(level).value


def level_from_wire(path: str, wire: str) -> Level | None:
    """Report.level's word as a level, None for "" (WireError naming `path` if unknown)."""
    if not wire:
        return None
    try:
        return Level(wire)
    except ValueError:
        raise WireError(f"{path}: {wire!r} is not a known level") from None


# --- donor events --------------------------------------------------------------------------


def event_to_proto(event: link.DonorEvent) -> pb.DonorEvent:
    message = event.message
    wire = pb.DonorEvent(seq=event.seq)
    if isinstance(message, link.Hello):
        wire.hello.CopyFrom(
            pb.Hello(
                agent_version=message.agent_version,
                capacity=capacity_to_proto(message.capacity),
                guests=[guest_to_proto(g) for g in message.guests],
            )
        )
    elif isinstance(message, link.Report):
        wire.report.CopyFrom(
            pb.Report(
                capacity=capacity_to_proto(message.capacity),
                guests=[guest_to_proto(g) for g in message.guests],
                level=level_to_wire(message.level),
            )
        )
    elif isinstance(message, link.Reclaim):
        wire.reclaim.CopyFrom(
            pb.ReclaimRequest(workload_ids=list(message.workload_ids), reason=message.reason)
        )
    else:
        result = pb.CommandResult(
            command_seq=message.command_seq, ok=message.ok, error=message.error[: link.MAX_TEXT]
        )
        if message.prepared is not None:
            result.prepared.CopyFrom(migration_target_to_proto(message.prepared))
        if message.checkpoint is not None:
            result.checkpoint.CopyFrom(checkpoint_to_proto(message.checkpoint))
        if message.migration is not None:
            result.migration.CopyFrom(
                pb.MigrationReport(
                    seconds=message.migration.seconds, downtime_ms=message.migration.downtime_ms
                )
            )
        wire.result.CopyFrom(result)
    return wire


def event_from_proto(wire: pb.DonorEvent) -> link.DonorEvent:
    kind = wire.WhichOneof("kind")
    message: link.DonorMessage
    if kind == "hello":
        hello = wire.hello
        if not hello.HasField("capacity"):
            raise WireError("hello.capacity: missing")
        message = link.Hello(
            agent_version=text("hello.agent_version", hello.agent_version, 64),
            capacity=capacity_from_proto(hello.capacity, "hello.capacity"),
            guests=guests_from_proto(hello.guests, "hello.guests"),
        )
    elif kind == "report":
        report = wire.report
        if not report.HasField("capacity"):
            raise WireError("report.capacity: missing")
        message = link.Report(
            capacity=capacity_from_proto(report.capacity, "report.capacity"),
            guests=guests_from_proto(report.guests, "report.guests"),
            level=level_from_wire("report.level", text("report.level", report.level, 32)),
        )
    elif kind == "reclaim":
        reclaim = wire.reclaim
        if len(reclaim.workload_ids) > link.MAX_GUESTS_PER_REPORT:
            raise WireError(f"reclaim.workload_ids: more than {link.MAX_GUESTS_PER_REPORT}")
        message = link.Reclaim(
            workload_ids=tuple(
                identifier(f"reclaim.workload_ids[{i}]", w)
                for i, w in enumerate(reclaim.workload_ids)
            ),
            reason=text("reclaim.reason", reclaim.reason, 64),
        )
    elif kind == "result":
        result = wire.result
        migration = None
        if result.HasField("migration"):
            seconds, downtime = result.migration.seconds, result.migration.downtime_ms
            if not (0 <= seconds < 1e6 and 0 <= downtime < 1e9):
                raise WireError("result.migration: seconds or downtime_ms out of range")
            migration = link.MigrationReport(seconds, downtime)
        message = link.CommandResult(
            command_seq=result.command_seq,
            ok=result.ok,
            error=text("result.error", result.error),
            prepared=migration_target_from_proto(result.prepared, "result.prepared")
            if result.HasField("prepared")
            else None,
            checkpoint=checkpoint_from_proto(result.checkpoint, "result.checkpoint")
            if result.HasField("checkpoint")
            else None,
            migration=migration,
        )
    else:
        raise WireError("kind: the event carries none of hello, report, reclaim, result")
    return link.DonorEvent(seq=wire.seq, message=message)


# --- checkpoints and migration -----------------------------------------------------------


def checkpoint_to_proto(info: link.CheckpointInfo) -> pb.CheckpointInfo:
    return pb.CheckpointInfo(
        sha256=info.sha256,
        size=info.size,
        epoch=info.epoch,
        taken_at=timestamp(info.taken_at),
        donor_id=info.donor_id,
    )


def checkpoint_from_proto(message: pb.CheckpointInfo, path: str) -> link.CheckpointInfo:
    if not SHA256_PATTERN.fullmatch(message.sha256):
        raise WireError(f"{path}.sha256: {message.sha256[:80]!r} is not 64 lowercase hex digits")
    if message.size <= 0:
        raise WireError(f"{path}.size: must be positive")
    if not message.HasField("taken_at"):
        raise WireError(f"{path}.taken_at: missing")
    return link.CheckpointInfo(
        sha256=message.sha256,
        size=message.size,
        epoch=message.epoch,
        taken_at=time_at(f"{path}.taken_at", message.taken_at),
        donor_id=identifier(f"{path}.donor_id", message.donor_id) if message.donor_id else "",
    )


def migration_target_to_proto(target: link.MigrationTarget) -> pb.MigrationTarget:
    return pb.MigrationTarget(
        libvirt_uri=target.libvirt_uri,
        migrate_uri=target.migrate_uri,
        kernel_path=target.kernel_path,
        initrd_path=target.initrd_path,
        console_path=target.console_path,
    )


def migration_target_from_proto(message: pb.MigrationTarget, path: str) -> link.MigrationTarget:
    for name in ("libvirt_uri", "migrate_uri", "kernel_path", "console_path"):
        if not getattr(message, name):
            raise WireError(f"{path}.{name}: missing")
    return link.MigrationTarget(
        libvirt_uri=text(f"{path}.libvirt_uri", message.libvirt_uri),
        migrate_uri=text(f"{path}.migrate_uri", message.migrate_uri),
        kernel_path=text(f"{path}.kernel_path", message.kernel_path),
        initrd_path=text(f"{path}.initrd_path", message.initrd_path),
        console_path=text(f"{path}.console_path", message.console_path),
    )


def limits_to_proto(limits: link.MigrationLimits) -> pb.MigrationLimits:
    return pb.MigrationLimits(
        bandwidth_mibps=limits.bandwidth_mibps,
        max_downtime_ms=limits.max_downtime_ms,
        deadline_s=limits.deadline_s,
        tls=limits.tls,
    )


def limits_from_proto(message: pb.MigrationLimits, path: str) -> link.MigrationLimits:
    if not 1 <= message.deadline_s <= 24 * 3600:
        raise WireError(f"{path}.deadline_s: {message.deadline_s} is outside 1–86400")
    if not 1 <= message.max_downtime_ms <= 60_000:
        raise WireError(f"{path}.max_downtime_ms: {message.max_downtime_ms} is outside 1–60000")
    return link.MigrationLimits(
        bandwidth_mibps=message.bandwidth_mibps,
        max_downtime_ms=message.max_downtime_ms,
        deadline_s=message.deadline_s,
        tls=message.tls,
    )


# --- commands ------------------------------------------------------------------------------


def command_to_proto(command: link.Command) -> pb.Command:
    message = command.message
    wire = pb.Command(seq=command.seq)
    if isinstance(message, link.Ack):
        wire.ack.CopyFrom(
            pb.Ack(event_seq=message.event_seq, lease_until=timestamp(message.lease_until))
        )
    elif isinstance(message, link.Welcome):
        wire.welcome.CopyFrom(
            pb.Welcome(
                donor_id=message.donor_id,
                lease_ttl_s=message.lease_ttl_s,
                report_interval_s=message.report_interval_s,
            )
        )
    elif isinstance(message, link.RunWorkload):
        wire.run.CopyFrom(
            pb.RunWorkload(
                workload_id=message.workload_id,
                epoch=message.epoch,
                spec=spec_to_proto(message.spec, message.priority),
                checkpoint=checkpoint_to_proto(message.checkpoint) if message.checkpoint else None,
            )
        )
    elif isinstance(message, link.PrepareMigration):
        wire.prepare.CopyFrom(
            pb.PrepareMigration(
                workload_id=message.workload_id,
                epoch=message.epoch,
                spec=spec_to_proto(message.spec),
                source_donor_id=message.source_donor_id,
            )
        )
    elif isinstance(message, link.StopWorkload):
        wire.stop.CopyFrom(
            pb.StopWorkload(
                workload_id=message.workload_id, epoch=message.epoch, reason=message.reason
            )
        )
    elif isinstance(message, link.Evacuate):
        wire.evacuate.CopyFrom(
            pb.Evacuate(
                workload_id=message.workload_id,
                epoch=message.epoch,
                target_donor_id=message.target_donor_id,
                target=migration_target_to_proto(message.target) if message.target else None,
                target_epoch=message.target_epoch,
                limits=limits_to_proto(message.limits),
            )
        )
    else:
        wire.checkpoint.CopyFrom(
            pb.Checkpoint(
                workload_id=message.workload_id,
                epoch=message.epoch,
                upload=message.upload,
                keep_running=message.keep_running,
            )
        )
    return wire


def command_from_proto(wire: pb.Command) -> link.Command:
    kind = wire.WhichOneof("kind")
    message: link.CoordinatorMessage
    if kind == "ack":
        message = link.Ack(
            event_seq=wire.ack.event_seq,
            lease_until=time_at("ack.lease_until", wire.ack.lease_until),
        )
    elif kind == "welcome":
        message = link.Welcome(
            donor_id=identifier("welcome.donor_id", wire.welcome.donor_id),
            lease_ttl_s=wire.welcome.lease_ttl_s,
            report_interval_s=wire.welcome.report_interval_s,
        )
    elif kind == "run":
        spec, priority = spec_from_proto(wire.run.spec, "run.spec")
        message = link.RunWorkload(
            workload_id=identifier("run.workload_id", wire.run.workload_id),
            epoch=wire.run.epoch,
            spec=spec,
            priority=priority,
            checkpoint=checkpoint_from_proto(wire.run.checkpoint, "run.checkpoint")
            if wire.run.HasField("checkpoint")
            else None,
        )
    elif kind == "prepare":
        spec, _ = spec_from_proto(wire.prepare.spec, "prepare.spec")
        message = link.PrepareMigration(
            workload_id=identifier("prepare.workload_id", wire.prepare.workload_id),
            epoch=wire.prepare.epoch,
            spec=spec,
            source_donor_id=identifier("prepare.source_donor_id", wire.prepare.source_donor_id),
        )
    elif kind == "stop":
        message = link.StopWorkload(
            workload_id=identifier("stop.workload_id", wire.stop.workload_id),
            epoch=wire.stop.epoch,
            reason=text("stop.reason", wire.stop.reason),
        )
    elif kind == "evacuate":
        message = link.Evacuate(
            workload_id=identifier("evacuate.workload_id", wire.evacuate.workload_id),
            epoch=wire.evacuate.epoch,
            target_donor_id=identifier("evacuate.target_donor_id", wire.evacuate.target_donor_id),
            target=migration_target_from_proto(wire.evacuate.target, "evacuate.target")
            if wire.evacuate.HasField("target")
            else None,
            target_epoch=wire.evacuate.target_epoch,
            limits=limits_from_proto(wire.evacuate.limits, "evacuate.limits")
            if wire.evacuate.HasField("limits")
            else link.MigrationLimits(),
        )
    elif kind == "checkpoint":
        message = link.Checkpoint(
            workload_id=identifier("checkpoint.workload_id", wire.checkpoint.workload_id),
            epoch=wire.checkpoint.epoch,
            upload=wire.checkpoint.upload,
            keep_running=wire.checkpoint.keep_running,
        )
    else:
        raise WireError("kind: the command carries nothing known")
    return link.Command(seq=wire.seq, message=message)
