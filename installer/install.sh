#!/bin/sh
# donor-app for Linux without dpkg (from the tarball made by installer/build-tarball).
#
#   install.sh --silent [--config fleet.toml]   install or upgrade, no questions
#   install.sh --uninstall [--purge]            remove it (--purge: its state too)
#
# The result is the .deb's: the app in /opt/donor-app, the agent as the systemd unit
# donor-agent.service (here in /etc/systemd/system, the admin's unit directory), the
# tray started in every desktop session, commands in /usr/local/bin. The fleet config is
# checked before anything changes and lands in /etc/donor_app (token 0600, removed
# after enrolling). State (/etc/donor_app, /var/lib/donor_app, /var/cache/donor_app)
# survives --uninstall and upgrades; --purge removes it.
#
# Exit codes (for fleet tools): 0 done, 2 usage, 3 fleet config missing or unreadable,
# 4 fleet config invalid, 5 cannot write, 6 a prerequisite is missing (root,
# /usr/bin/python3.11, libvirt's libvirt.so.0), 7 a running agent would not stop.
# No file has changed when it exits with 2, 3, 4, 6 or 7 (on 7 the agent was asked to stop).
set -eu

here="$(cd "$(dirname "$0")" && pwd)"
UNIT_DIR=/etc/systemd/system
WANTS="$UNIT_DIR/multi-user.target.wants"
BIN_DIR=/usr/local/bin
SHARE_DIR=/usr/local/share
# Every file outside /opt/donor-app that this script puts down; uninstall removes them.
MANIFEST_NAME=install-manifest.txt

usage() {
    sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

fail() {  # fail CODE MESSAGE
    echo "donor-app: $2" >&2
    exit "$1"
}

mode=""
config=""
purge=0
while [ $# -gt 0 ]; do
    case "$1" in
        --silent) mode=install ;;
        --uninstall) mode=uninstall ;;
        --purge) purge=1 ;;
        --config) [ $# -ge 2 ] || usage; config="$2"; shift ;;
        -h | --help) usage ;;
        *) echo "install.sh: unknown argument: $1" >&2; usage ;;
    esac
    shift
done
[ -n "$mode" ] || usage
[ "$mode" = uninstall ] || [ "$purge" -eq 0 ] || usage
[ "$mode" = install ] || [ -z "$config" ] || usage

# The shared functions: beside this script in the tarball, in libexec once installed.
if [ -f "$here/agent-control.sh" ]; then
    . "$here/agent-control.sh"
else
    . /opt/donor-app/libexec/agent-control.sh
fi

[ "$(id -u)" -eq 0 ] || fail 6 "run as root (it installs a system service)"

install_files() {
    payload="$here/payload"
    [ -d "$payload/opt/donor-app" ] || fail 2 "no payload beside $0: run the install.sh of an unpacked tarball"
    [ -x /usr/bin/python3.11 ] || fail 6 "needs /usr/bin/python3.11 (the bundled app is built for CPython 3.11)"
    if ! ldconfig -p 2>/dev/null | grep -q 'libvirt\.so\.0 '; then
        fail 6 "needs libvirt's client library libvirt.so.0 (e.g. package libvirt0 / libvirt-libs)"
    fi
    if [ -n "$config" ]; then
        # Before anything changes; the same checker the .deb runs, with the system python.
        status=0
        /usr/bin/python3.11 "$payload/opt/donor-app/libexec/fleet-check.pyz" check "$config" \
            || status=$?
        [ "$status" -eq 0 ] || exit "$status"
    fi
    stop_agents || exit 7

    # An upgrade keeps the old manifest's entries: the directories the first install made
    # exist now, so this run would not note them, and uninstall must still remove them.
    previous="$(cat "/opt/donor-app/$MANIFEST_NAME" 2>/dev/null || true)"
    # The new tree beside the old one, then swapped: a failed copy leaves the old install.
    rm -rf /opt/donor-app.new /opt/donor-app.old
    mkdir -p /opt
    cp -a "$payload/opt/donor-app" /opt/donor-app.new || fail 5 "cannot write /opt"
    install -m 0644 "$here/agent-control.sh" /opt/donor-app.new/libexec/agent-control.sh
    install -m 0755 "$0" /opt/donor-app.new/libexec/install.sh
    [ ! -e /opt/donor-app ] || mv /opt/donor-app /opt/donor-app.old
    mv /opt/donor-app.new /opt/donor-app
    rm -rf /opt/donor-app.old

    manifest=/opt/donor-app/$MANIFEST_NAME
    printf '%s\n' "$previous" | grep -v '^$' >"$manifest" || true
    mkdirs() {  # mkdirs DIR: make DIR and its missing parents, each noted ("DIR/")
        [ -d "$1" ] && return 0
        mkdirs "$(dirname "$1")"
        mkdir -m 0755 "$1"
        echo "$1/" >>"$manifest"
    }
    put() {  # put MODE SOURCE TARGET
        mkdirs "$(dirname "$3")"
        install -m "$1" "$2" "$3"
        echo "$3" >>"$manifest"
    }
    mkdirs "$BIN_DIR"
    for name in donor-agent donor-app donor-coordinator; do
        ln -sfn "/opt/donor-app/bin/$name" "$BIN_DIR/$name"
        echo "$BIN_DIR/$name" >>"$manifest"
    done
    put 0644 "$payload/lib/systemd/system/donor-agent.service" "$UNIT_DIR/donor-agent.service"
    put 0644 "$payload/etc/xdg/autostart/donor-app.desktop" /etc/xdg/autostart/donor-app.desktop
    put 0644 "$payload/usr/share/applications/donor-app.desktop" \
        "$SHARE_DIR/applications/donor-app.desktop"
    put 0644 "$payload/usr/share/icons/hicolor/scalable/apps/donor-app.svg" \
        "$SHARE_DIR/icons/hicolor/scalable/apps/donor-app.svg"

    if [ -n "$config" ]; then
        status=0
        /usr/bin/python3.11 /opt/donor-app/libexec/fleet-check.pyz install "$config" /etc/donor_app \
            || status=$?
        [ "$status" -eq 0 ] || exit "$status"
    fi
    install -d -m 0755 /etc/donor_app /var/lib/donor_app /var/cache/donor_app
    mkdirs "$WANTS"
    ln -sfn "$UNIT_DIR/$DONOR_UNIT" "$WANTS/$DONOR_UNIT"
    echo "$WANTS/$DONOR_UNIT" >>"$manifest"
    sort -u -o "$manifest" "$manifest"
    if systemd_running; then
        systemctl daemon-reload
        systemctl restart "$DONOR_UNIT"
        echo "donor-app: installed; $DONOR_UNIT started" >&2
    else
        echo "donor-app: installed; systemd is not running here: $DONOR_UNIT is enabled for" \
            "the next boot" >&2
    fi
}

uninstall() {
    if systemd_running; then
        systemctl disable "$DONOR_UNIT" 2>/dev/null || true
    fi
    stop_agents || exit 7
    checkpoint_guests
    manifest=/opt/donor-app/$MANIFEST_NAME
    if [ -f "$manifest" ]; then
        grep -v '/$' "$manifest" | while IFS= read -r path; do rm -f "$path"; done
        # The directories it made, children first (reverse order sorts them so), and
        # only when empty: someone else may have put files there since.
        grep '/$' "$manifest" | sort -r | while IFS= read -r dir; do
            rmdir "$dir" 2>/dev/null || true
        done
    fi
    rm -rf /opt/donor-app /run/donor_app
    if systemd_running; then
        systemctl daemon-reload || true
    fi
    if [ "$purge" -eq 1 ]; then
        rm -rf /etc/donor_app /var/lib/donor_app /var/cache/donor_app
        echo "donor-app: removed, with its state" >&2
    else
        echo "donor-app: removed; state kept in /etc/donor_app, /var/lib/donor_app" \
            "(--uninstall --purge removes it)" >&2
    fi
}

if [ "$mode" = install ]; then
    install_files
else
    uninstall
fi
