# Shell functions shared by the .deb's maintainer scripts and install.sh (build-deb
# pastes this file in at "#@AGENT_CONTROL@": a maintainer script must stand alone, it
# cannot source files from a package that may be half unpacked). POSIX sh.

DONOR_APP_DIR=/opt/donor-app
DONOR_UNIT=donor-agent.service
# The agent pauses its guests on SIGTERM; saving state of several guests can take a while.
DONOR_STOP_TIMEOUT=90

systemd_running() {
    [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1
}

# The pids of agents running from this installation (the system service and any
# user-level agent a tray started), and only this root's: a process in another chroot
# or container sees a different /opt/donor-app.
agent_pids() {
    for proc in /proc/[0-9]*; do
        [ "$proc/root$DONOR_APP_DIR" -ef "$DONOR_APP_DIR" ] 2>/dev/null || continue
        cmdline="$(tr '\0' ' ' <"$proc/cmdline" 2>/dev/null)" || continue
        case "$cmdline" in
            *"$DONOR_APP_DIR/bin/donor-agent"* | *"$DONOR_APP_DIR/bin/python"*donor_app.cli*)
                echo "${proc#/proc/}" ;;
        esac
    done
}

# Stop every agent of this installation and wait (with a deadline) until they are gone.
# SIGTERM makes the agent pause its guests and close its coordinator stream; the
# coordinator then sees the donor leave. Returns 1 if one is still running at the deadline.
stop_agents() {
    if systemd_running; then
        systemctl stop "$DONOR_UNIT" 2>/dev/null || true
    fi
    pids="$(agent_pids)"
    [ -n "$pids" ] || return 0
    echo "donor-app: stopping the agent (pid $(echo $pids)); its guests stay paused" >&2
    # shellcheck disable=SC2086  # a list of pids
    kill -TERM $pids 2>/dev/null || true
    waited=0
    while [ -n "$(agent_pids)" ]; do
        if [ "$waited" -ge "$DONOR_STOP_TIMEOUT" ]; then
            echo "donor-app: the agent (pid $(echo $(agent_pids))) did not stop within" \
                "${DONOR_STOP_TIMEOUT} s; stop it, then try again" >&2
            return 1
        fi
        sleep 1
        waited=$((waited + 1))
    done
}

# After stop_agents, on removal: save the guests the agent left paused to disk (see
# checkpoint_guests.py). Best effort: a guest left paused is still safe.
checkpoint_guests() {
    if [ -x "$DONOR_APP_DIR/libexec/checkpoint-guests" ]; then
        "$DONOR_APP_DIR/libexec/checkpoint-guests" || true
    fi
}

# Where the fleet config to install comes from: $DONOR_FLEET_CONFIG, else the debconf
# answer donor-app/fleet-config (preseeded) while no fleet config is installed yet (an
# upgrade must not re-apply an old answer over the admin's later edits), else nothing.
fleet_config_source() {
    if [ -n "${DONOR_FLEET_CONFIG:-}" ]; then
        echo "$DONOR_FLEET_CONFIG"
        return
    fi
    [ ! -e /etc/donor_app/fleet.toml ] || return 0
    if command -v debconf-communicate >/dev/null 2>&1; then
        # "0 VALUE" when the question has an answer; anything else: no answer.
        answer="$(echo "GET donor-app/fleet-config" | debconf-communicate donor-app 2>/dev/null)" \
            || true
        case "$answer" in
            "0 "?*) echo "${answer#0 }" ;;
        esac
    fi
}
