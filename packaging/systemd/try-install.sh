#!/usr/bin/env bash
# try-install.sh: follow packaging/systemd/README.md's install steps word for word in a fresh
# Debian bookworm guest booted with systemd-nspawn, then check that an app unit ordered after
# syncd starts with its files restored. Prints PASS or FAIL (exit 0 or 1).
#
# Run by hand, as root, on a Debian-like host (needs apt for debootstrap and systemd-container,
# and the Debian mirror once): it is not part of the test suite. About a minute the first time
# (debootstrap, cached in ~/.cache/syncd-try-install), then about 30 s.
#
#   sudo packaging/systemd/try-install.sh
#
# What it does
#   1. a bookworm rootfs (debootstrap, cached) copied afresh for each run, the working tree's
#      files (git ls-files, uncommitted changes included) in /root/syncd;
#   2. a wheelhouse of the pinned versions (constraints.txt, cached): the guest has a private
#      network, so pip reads it (PIP_NO_INDEX, PIP_FIND_LINKS) and the README's pip command
#      stays as written;
#   3. boots the guest and runs, in /root/syncd, the ```sh blocks of the README's "Install"
#      section, then `systemctl enable --now syncd` from "Enable". A reader's own choices are
#      the only changes, and are printed: the editor sets [remote] url to
#      file:///srv/syncd-remote, and the drop-in lists that directory after the watch, as the
#      README says to for a file:// remote;
#   4. an app writes files into the watch (as www-data); they reach the remote; a reload
#      (SIGHUP) is no warning; syncd and the app stop, the files are removed, and the app is
#      started: an app unit with the README's After=/Requires= lines checks its files in
#      ExecStartPre and must end up running; then syncd-resync.service (the timer's) restores
#      the files again with syncd stopped; a watch removed entirely stops syncd with one line
#      that says so (exit 2, not restarted).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
README=$REPO/packaging/systemd/README.md
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/syncd-try-install
SUITE=bookworm
MIRROR=${MIRROR:-http://deb.debian.org/debian}
GUEST=$CACHE/guest  # the running guest's root, made afresh from $CACHE/$SUITE
KEEP=${KEEP:-0}      # KEEP=1: leave the guest's root for a look afterwards

say() { printf '== %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*"; exit 1; }

[ "$(id -u)" -eq 0 ] || fail "run as root (debootstrap, systemd-nspawn, nsenter)"
need=()
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v systemd-nspawn >/dev/null || need+=(systemd-container)
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
    say "apt-get install ${need[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
mkdir -p "$CACHE"

# --- 1. the rootfs ---------------------------------------------------------------------------------
if [ ! -x "$CACHE/$SUITE/usr/bin/python3" ]; then
    say "debootstrap $SUITE from $MIRROR (once; cached in $CACHE/$SUITE)"
    rm -rf "$CACHE/$SUITE.tmp"
    debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,python3,python3-venv \
        "$SUITE" "$CACHE/$SUITE.tmp" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
        || fail "debootstrap could not build $SUITE from $MIRROR (see $CACHE/debootstrap.log)"
    mv "$CACHE/$SUITE.tmp" "$CACHE/$SUITE"
fi

# --- 2. the wheelhouse -----------------------------------------------------------------------------
key=$(cat "$REPO/constraints.txt" "$REPO/pyproject.toml" | sha256sum | cut -c1-16)
WHEELS=$CACHE/wheels-$key
if [ ! -d "$WHEELS" ]; then
    say "wheelhouse of the pinned versions (cached in $WHEELS)"
    [ -x "$CACHE/pip/bin/pip" ] || python3 -m venv "$CACHE/pip"
    "$CACHE/pip/bin/pip" wheel -q --wheel-dir "$WHEELS.tmp" -c "$REPO/constraints.txt" "$REPO" hatchling \
        >"$CACHE/wheels.log" 2>&1 || fail "pip could not fetch the wheels (see $CACHE/wheels.log)"
    rm -f "$WHEELS.tmp"/syncd-*.whl  # the guest builds syncd from its checkout, as the README does
    mv "$WHEELS.tmp" "$WHEELS"
fi

# --- 3. the steps, from the README -----------------------------------------------------------------
steps=$(awk '/^## Install$/ {f = 1; next} /^## / {f = 0}
             f && /^```sh$/ {c = 1; next} c && /^```$/ {c = 0; next} c' "$README")
[ -n "$steps" ] || fail "no \`\`\`sh blocks under '## Install' in $README"
grep -qx 'systemctl enable --now syncd' "$README" || fail "the README has no 'systemctl enable --now syncd' line"
app_unit=$(awk '/^## Start the app/ {f = 1; next} /^## / {f = 0}
                f && /^```ini$/ {c = 1; next} c && /^```$/ {c = 0; next} c && !/^#/' "$README")
grep -qx 'Requires=syncd.service' <<<"$app_unit" || fail "no Requires=syncd.service in the README's app unit"
# the reader's choice for a file:// remote, as the README says: its directory after the watch
grep -q '^ReadWritePaths=-/srv/app/uploads$' <<<"$steps" || fail "the README's drop-in changed: adapt this script"
steps=$(sed 's|^ReadWritePaths=-/srv/app/uploads$|ReadWritePaths=-/srv/app/uploads /srv/syncd-remote|' <<<"$steps")

# --- the guest -------------------------------------------------------------------------------------
say "a fresh guest in $GUEST"
rm -rf "$GUEST"
cp -a --reflink=auto "$CACHE/$SUITE" "$GUEST"
echo syncd-try > "$GUEST/etc/hostname"
mkdir -p "$GUEST/root/syncd" "$GUEST/root/try"
(cd "$REPO" && git ls-files -z --cached --others --exclude-standard \
    | tar --null -T - --ignore-failed-read -cf - 2>/dev/null) | tar -C "$GUEST/root/syncd" -xf -
cp -a "$WHEELS" "$GUEST/root/try/wheels"
printf '%s\n' "$steps" > "$GUEST/root/try/install-steps.sh"
printf '%s\n' "$app_unit" > "$GUEST/root/try/app-unit-lines"

cat > "$GUEST/root/try/edit-config" <<'EOF'
#!/bin/sh
# the reader's edit of /etc/syncd/syncd.toml: a file:// remote
sed -i 's|^url = .*|url = "file:///srv/syncd-remote"|' "$1"
EOF
chmod +x "$GUEST/root/try/edit-config"

cat > "$GUEST/root/try/run.sh" <<'EOF'
#!/bin/bash
set -euo pipefail
export PIP_NO_INDEX=1 PIP_FIND_LINKS=/root/try/wheels PIP_DISABLE_PIP_VERSION_CHECK=1
export EDITOR=/root/try/edit-config SYSTEMD_PAGER= SYSTEMD_COLORS=0
step() { printf '\n== %s\n' "$*"; }
fail() { printf 'failed: %s\n' "$*"; journalctl -u syncd -u syncd-resync -u app --no-pager -n 40 || true; exit 1; }
trap 'fail "line $LINENO: $BASH_COMMAND"' ERR
wait_for() {  # wait_for SECONDS WHAT COMMAND...
    local until=$((SECONDS + $1)) what=$2; shift 2
    until "$@"; do [ $SECONDS -lt $until ] || fail "$what (not within the deadline)"; sleep 0.5; done
}

cd /root/syncd
step "the README's install steps (reader's edits: url = file:///srv/syncd-remote, its directory in ReadWritePaths=)"
PS4='+ ' bash -euxo pipefail /root/try/install-steps.sh || fail "an install step failed"

step "systemctl enable --now syncd"
systemctl enable --now syncd || fail "systemctl enable --now syncd"
systemctl is-active --quiet syncd || fail "syncd is not active"
systemctl status syncd --no-pager -n 0 | sed -n '1,6p'

step "the app writes files; syncd uploads them"
runuser -u www-data -- sh -c 'umask 0002; mkdir -p "/srv/app/uploads/sub dir";
    echo one > /srv/app/uploads/a.txt; echo two > "/srv/app/uploads/sub dir/b.txt"'
wait_for 60 "the files in the remote" test -f "/srv/syncd-remote/uploads/sub dir/b.txt" -a -f /srv/syncd-remote/uploads/a.txt
systemctl reload syncd
wait_for 30 "the reload's rescan line" sh -c 'journalctl -u syncd --no-pager | grep -q "full rescan requested: SIGHUP"'
if journalctl -u syncd -p warning --no-pager | grep -q "rescan requested"; then fail "a reload is logged as a warning"; fi

step "an app unit with the README's lines: it starts only with its files there"
{
    cat /root/try/app-unit-lines  # [Unit] After=syncd.service Requires=syncd.service
    echo "Description=the app (needs its uploads)"
    echo "[Service]"
    echo "User=www-data"
    echo "ExecStartPre=/bin/sh -c 'grep -qx one /srv/app/uploads/a.txt && grep -qx two \"/srv/app/uploads/sub dir/b.txt\"'"
    echo "ExecStart=/bin/sleep infinity"
} > /etc/systemd/system/app.service
systemctl daemon-reload

step "stop, remove the files, start the app"
systemctl stop app syncd
rm -rf /srv/app/uploads/a.txt "/srv/app/uploads/sub dir"
systemctl start app || fail "the app did not start (its files were not back)"
systemctl is-active --quiet syncd || fail "syncd is not active"
systemctl is-active --quiet app || fail "the app is not running"
ls -l /srv/app/uploads "/srv/app/uploads/sub dir"

step "the timer's syncd-resync.service restores too (syncd stopped)"
systemctl stop app syncd
rm -rf /srv/app/uploads/a.txt "/srv/app/uploads/sub dir"
systemctl start syncd-resync.service || fail "syncd-resync.service failed"
journalctl -u syncd-resync --no-pager -n 3 -o cat
test -f /srv/app/uploads/a.txt -a -f "/srv/app/uploads/sub dir/b.txt" || fail "syncd-resync did not restore the files"
systemctl start app || fail "the app did not start after the resync"

step "a missing watch: syncd says so (exit 2), systemd does not restart it"
systemctl stop app syncd
rm -rf /srv/app/uploads
if systemctl start syncd; then fail "syncd started without its watch"; fi
journalctl -u syncd --no-pager -o cat -n 30 | grep "is missing and cannot be created" || fail "no line says the watch is missing"
[ "$(systemctl show -P Result syncd)" = exit-code ] && [ "$(systemctl show -P NRestarts syncd)" = 0 ] \
    || fail "syncd: result $(systemctl show -P Result syncd), $(systemctl show -P NRestarts syncd) restarts"

step "warnings and errors of this run"
journalctl -u syncd -u syncd-resync -p warning --no-pager -o cat || true
EOF
chmod +x "$GUEST/root/try/run.sh"

# --- boot, run, power off --------------------------------------------------------------------------
say "boot (console in $CACHE/console.log)"
SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1 systemd-nspawn -b -D "$GUEST" --register=no --keep-unit \
    --private-network --console=read-only >"$CACHE/console.log" 2>&1 &
nspawn=$!
cleanup() {
    if kill -0 "$nspawn" 2>/dev/null; then
        [ -n "${init:-}" ] && nsenter -t "$init" -a systemctl poweroff >/dev/null 2>&1 || true
        for _ in $(seq 60); do kill -0 "$nspawn" 2>/dev/null || break; sleep 0.5; done
        kill "$nspawn" 2>/dev/null || true
        wait "$nspawn" 2>/dev/null || true
    fi
    [ "$KEEP" = 1 ] || rm -rf "$GUEST"
}
trap cleanup EXIT
init=""
for _ in $(seq 120); do
    init=$(ps -o pid= --ppid "$nspawn" | tr -d ' ' | head -1 || true)
    [ -n "$init" ] && nsenter -t "$init" -a true 2>/dev/null && break
    kill -0 "$nspawn" 2>/dev/null || fail "systemd-nspawn could not boot the guest: $(tail -3 "$CACHE/console.log")"
    init=""; sleep 0.5
done
[ -n "$init" ] || fail "the guest did not come up"
G() { nsenter -t "$init" -a -- env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TERM=dumb LANG=C.UTF-8 "$@"; }
state=$(G timeout 120 systemctl is-system-running --wait || true)
say "guest booted: $state"

if G bash /root/try/run.sh; then
    echo PASS
else
    echo "FAIL (the guest's output above)"
    exit 1
fi
