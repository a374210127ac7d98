#!/usr/bin/env bash
# syncd beside an app whose disk is ephemeral (see README.md).
#
#   entrypoint.sh APP [ARGS...]
#
# 1. `syncd resync --no-upload`: the app's files come back from the remote before it starts.
# 2. `syncd run`, then the app once syncd is READY (its HTTP endpoint serves by then: nginx's
#    fallback to syncd's port would answer 502 to an app started earlier); either one ending
#    ends the container.
# 3. SIGTERM/SIGINT go to the app first; once it has exited (it writes nothing more), syncd
#    is stopped and a last `syncd resync --no-restore` uploads what was still pending. If
#    `syncd run` dies first (kill -9, OOM), the app is stopped and the same last upload runs.
#
# Lazy mode (SYNCD_LAZY=1, with `lazy_restore = true` in the config): no step 1; `syncd run`
# starts first and the app starts as soon as syncd is READY (its local scan done); the missing
# files are restored behind it (with `serve_files`, a request for one restores it first).
#
# Environment: SYNCD_BIN (default: syncd), SYNCD_CONFIG (read by syncd itself),
# SYNCD_REQUIRE_RESTORE=0 to start the app even when the remote cannot be reached,
# SYNCD_LAZY=1 for the lazy mode.
# Needs bash >= 5.1 (wait -n -p).
set -uo pipefail

syncd=${SYNCD_BIN:-syncd}
app_pid="" syncd_pid="" current="" stopping=0

log() { echo "syncd-entrypoint: $*" >&2; }

# The exit status of pid $1, waiting through the interruptions of trapped signals.
wait_pid() {
    local rc again
    while :; do
        wait "$1"; rc=$?
        if ! kill -0 "$1" 2>/dev/null; then
            # above 128 may be a signal interrupting `wait`, not the child: ask once more (127
            # means that wait already returned the child's own status)
            if [ "$rc" -gt 128 ]; then
                wait "$1" 2>/dev/null; again=$?
                [ "$again" -ne 127 ] && rc=$again
            fi
            return "$rc"
        fi
    done
}

# PID 1 ignores signals it has no handler for: forward them. Before the app runs, to the
# step in progress; afterwards, to the app only (syncd follows once the app has exited).
on_signal() {
    stopping=1
    if [ -n "$app_pid" ]; then
        kill -TERM "$app_pid" 2>/dev/null
    elif [ -n "$current" ]; then
        kill -TERM "$current" 2>/dev/null
    fi
}
trap on_signal TERM INT

if [ "$#" -eq 0 ]; then
    log "usage: entrypoint.sh APP [ARGS...]"
    exit 2
fi

# 1. restore first
restore_first() {
    "$syncd" resync --no-upload & current=$!
    wait_pid "$current"; rc=$?
    current="" restore_rc=$rc
    if [ "$stopping" = 1 ]; then
        log "stopped during the restore"
        exit 143
    fi
    case $rc in
        0) ;;
        1) log "some files could not be restored (listed above); starting the app, syncd retries them" ;;
        3) if [ "${SYNCD_REQUIRE_RESTORE:-1}" = 1 ]; then
               log "the remote cannot be used (exit 3); not starting the app without its files" \
                   "(SYNCD_REQUIRE_RESTORE=0 starts it anyway)"
               exit 3
           fi
           log "the remote cannot be used (exit 3); starting the app anyway (SYNCD_REQUIRE_RESTORE=0)" ;;
        *) log "restore failed (exit $rc)"
           exit "$rc" ;;
    esac
}

# `syncd run`, and wait until it is READY (`syncd status --json`: "ready": true): its HTTP
# endpoint (/healthz, /files/) has served since before that, its watcher runs and its scan is
# done. Lazy mode: the missing files are restored behind it. $1=1 waits; 0 does not (the remote
# cannot be used and SYNCD_REQUIRE_RESTORE=0: READY waits for the remote, the app does not).
start_syncd() {
    "$syncd" run & syncd_pid=$! current=$!
    if [ "$1" = 1 ]; then
        until [[ $("$syncd" status --json 2>/dev/null) == *'"ready": true'* ]]; do
            if [ "$stopping" = 1 ] || ! kill -0 "$syncd_pid" 2>/dev/null; then
                break
            fi
            sleep 0.2 & wait $!  # `wait` returns at once when a trapped signal arrives
        done
    fi
    current=""
    if [ "$stopping" = 1 ]; then
        log "stopped before syncd was ready"
        kill -TERM "$syncd_pid" 2>/dev/null
        wait_pid "$syncd_pid"
        exit 143
    fi
    if ! kill -0 "$syncd_pid" 2>/dev/null; then
        wait_pid "$syncd_pid"; rc=$?
        log "syncd exited (status $rc) before it was ready; not starting the app"
        exit $(( rc == 0 ? 1 : rc ))
    fi
}

# 2. syncd beside the app
if [ "${SYNCD_LAZY:-0}" = 1 ]; then
    start_syncd "${SYNCD_REQUIRE_RESTORE:-1}"
else
    restore_first
    start_syncd "$(( restore_rc != 3 ))"
fi
"$@" & app_pid=$!
if [ "$stopping" = 1 ]; then  # a signal between the restore and here
    kill -TERM "$app_pid" 2>/dev/null
fi

app_rc="" syncd_rc=""
while [ -z "$app_rc" ] && [ -z "$syncd_rc" ]; do
    wait -n -p done_pid "$app_pid" "$syncd_pid"; rc=$?
    # done_pid: the child that ended; unset when a signal interrupted the wait
    if [ "${done_pid:-}" = "$app_pid" ]; then
        app_rc=$rc
    elif [ "${done_pid:-}" = "$syncd_pid" ]; then
        syncd_rc=$rc
    fi  # else a signal interrupted the wait; on_signal has forwarded it
done

# 3. stop
if [ -z "$app_rc" ]; then
    # syncd does not exit over remote problems; if it ended (kill -9, the OOM killer), new
    # files are no longer kept safe, so the container ends and the orchestrator restarts it
    # (restoring first). What syncd had queued is still on this disk: uploaded below.
    log "syncd exited (status $syncd_rc); stopping the app"
    kill -TERM "$app_pid" 2>/dev/null
    wait_pid "$app_pid"
    rc=$(( syncd_rc == 0 ? 1 : syncd_rc ))
else
    [ "$stopping" = 1 ] || log "the app exited (status $app_rc); stopping syncd"
    kill -TERM "$syncd_pid" 2>/dev/null
    wait_pid "$syncd_pid"
    rc=$app_rc
fi
# files the app wrote in its last seconds, and whatever a dead `run` left queued: `run`
# stops without starting new uploads, and the disk goes with the container
"$syncd" resync --no-restore & current=$!
wait_pid "$current" || log "the last upload failed (exit $?); see the lines above"
exit "$rc"
