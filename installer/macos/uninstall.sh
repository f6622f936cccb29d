#!/bin/bash
# Removes donor_app from a Mac (pkgs have no uninstaller): stops the agent (its guests
# stay paused) and the trays, removes every installed file and the package receipt.
# --purge also removes the state: fleet config and token, enrollment, settings, history.
# Exit codes: 0 done, 2 usage, 6 not root.
set -euo pipefail
purge=0
case "${1:-}" in
    "") ;;
    --purge) purge=1 ;;
    *) echo "usage: uninstall.sh [--purge]" >&2; exit 2 ;;
esac
[ "$(id -u)" -eq 0 ] || { echo "donor-app: run as root" >&2; exit 6; }

launchctl bootout system/org.donor_app.agent 2>/dev/null || true
for uid in $(ps -axo uid= -o comm= | awk '/donor-app$/ {print $1}' | sort -u); do
    launchctl bootout "gui/$uid/org.donor_app.tray" 2>/dev/null || true
done
rm -f /Library/LaunchDaemons/org.donor_app.agent.plist /Library/LaunchAgents/org.donor_app.tray.plist
rm -rf /Library/donor_app /var/run/donor_app
pkgutil --forget org.donor_app.pkg >/dev/null 2>&1 || true
if [ "$purge" -eq 1 ]; then
    rm -rf "/Library/Application Support/donor_app" /Library/Caches/donor_app /Library/Logs/donor_app
fi
