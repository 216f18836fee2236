#!/usr/bin/env bash
# Makes the optional services of the integration tests available, when it can:
#   - PostgreSQL server binaries (initdb, pg_ctl, postgres): the tuning tests start their own
#     throw-away server on 127.0.0.1 in a temporary folder; nothing is started here.
#   - headless Chromium: the report test renders report.html and takes a screenshot.
# Installs missing ones with apt-get only when running as root on a Debian/Ubuntu machine.
# It never fails the test run: whatever stays missing makes its tests skip with a reason.
set -u
log() { echo "ensure_test_services: $*"; }

have_postgres() {
    command -v pg_ctl >/dev/null 2>&1 && return 0
    compgen -G "/usr/lib/postgresql/*/bin/pg_ctl" >/dev/null 2>&1
}
have_chromium() {
    local name
    for name in chromium chromium-browser google-chrome google-chrome-stable chrome headless_shell; do
        command -v "$name" >/dev/null 2>&1 && return 0
    done
    return 1
}

missing=()
have_postgres || missing+=(postgresql)
have_chromium || missing+=(chromium)
if [ "${#missing[@]}" -eq 0 ]; then
    log "PostgreSQL and Chromium are available"
    exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    log "missing: ${missing[*]} (not root or no apt-get); their tests will skip"
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
log "installing: ${missing[*]}"
if ! timeout 600 apt-get update -qq >/dev/null 2>&1; then
    log "apt-get update failed (offline?); tests needing ${missing[*]} will skip"
    exit 0
fi
for package in "${missing[@]}"; do
    if ! timeout 1200 apt-get install -y -qq --no-install-recommends "$package" >/dev/null 2>&1; then
        # Ubuntu names the browser chromium-browser
        if [ "$package" = chromium ] && timeout 1200 apt-get install -y -qq --no-install-recommends chromium-browser >/dev/null 2>&1; then
            continue
        fi
        log "could not install $package; its tests will skip"
    fi
done
have_postgres && log "PostgreSQL: available" || log "PostgreSQL: unavailable"
have_chromium && log "Chromium: available" || log "Chromium: unavailable"
exit 0
