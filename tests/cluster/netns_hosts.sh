#!/usr/bin/env bash
# Two "hosts" for multi-node launches, made of network namespaces on this machine:
#
#   mt-h1 (10.77.0.1) --veth-- bridge mtbr0 (10.77.0.254) --veth-- mt-h2 (10.77.0.2)
#
# Each namespace has its own hostname (a UTS namespace), an /etc/hosts naming both
# hosts, an interface called eth0 (DeepSpeed's `--launcher openmpi` default) and an sshd
# that lets root in with a key made here. The namespaces have no default route: they
# reach only 10.77.0.0/24. The shared filesystem is this machine's, so paths (the repo,
# the venv) are the same on both hosts, as on a cluster with a shared home.
#
#   netns_hosts.sh start   installs openssh-server + pdsh when missing, makes the hosts
#                          (unless they answer already), prints the host names
#   netns_hosts.sh stop    removes the hosts, their sshd and the ssh client config
#
# Needs root. Idempotent. Commands run "on" a host with `ip netns exec mt-hN unshare
# --uts sh -c 'hostname mt-hN; ...'`, or over ssh from any of them or from this machine.
set -euo pipefail
source "$(dirname "$0")/packages.sh"

STATE=${MEGATRAIN_NETNS_DIR:-/run/megatrain-netns}
HOSTS=(mt-h1 mt-h2)
NET=10.77.0
BRIDGE=mtbr0
SSH_CLIENT_CONF=/etc/ssh/ssh_config.d/megatrain-test.conf
PACKAGES=(openssh-server openssh-client pdsh iproute2 util-linux)

log() { echo "netns_hosts: $*" >&2; }

address() { echo "$NET.${1#mt-h}"; }  # mt-h2 -> 10.77.0.2

answering() {
    local host
    for host in "${HOSTS[@]}"; do
        ssh -o ConnectTimeout=2 "$host" true 2>/dev/null || return 1
    done
}

check_subnet_free() {
    # Never shadow a network this machine already uses.
    if ip route show | grep -v "dev $BRIDGE" | grep -q "^$NET\."; then
        log "$NET.0/24 is already routed on this machine; refusing to create the test hosts"
        exit 1
    fi
}

make_keys() {
    mkdir -p "$STATE"
    chmod 700 "$STATE"
    [[ -f $STATE/id_ed25519 ]] || ssh-keygen -q -t ed25519 -N "" -C megatrain-test -f "$STATE/id_ed25519"
    [[ -f $STATE/host_ed25519 ]] || ssh-keygen -q -t ed25519 -N "" -C megatrain-test-host -f "$STATE/host_ed25519"
    cp "$STATE/id_ed25519.pub" "$STATE/authorized_keys"
    # The hosts are created fresh on every start, so their key is not worth pinning.
    cat >"$SSH_CLIENT_CONF" <<EOF
# Written by megatrain's tests/cluster/netns_hosts.sh; removed by its "stop".
Host ${HOSTS[*]} $NET.*
    IdentityFile $STATE/id_ed25519
    StrictHostKeyChecking no
    UserKnownHostsFile /dev/null
    LogLevel ERROR
    BatchMode yes
EOF
    for host in "${HOSTS[@]}"; do
        printf 'Host %s\n    HostName %s\n' "$host" "$(address "$host")"
    done >>"$SSH_CLIENT_CONF"
    cat >"$STATE/sshd_config" <<EOF
HostKey $STATE/host_ed25519
AuthorizedKeysFile $STATE/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
MaxStartups 64
EOF
}

make_host() {
    local host=$1 addr
    addr=$(address "$host")
    ip netns add "$host"
    ip link add "veth-$host" type veth peer name eth0 netns "$host"
    ip link set "veth-$host" master "$BRIDGE" up
    ip -n "$host" addr add "$addr/24" dev eth0
    ip -n "$host" link set eth0 up
    ip -n "$host" link set lo up
    # `ip netns exec` bind-mounts /etc/netns/NAME/hosts over /etc/hosts.
    mkdir -p "/etc/netns/$host"
    {
        echo "127.0.0.1 localhost"
        for h in "${HOSTS[@]}"; do echo "$(address "$h") $h"; done
    } >"/etc/netns/$host/hosts"
    ip netns exec "$host" unshare --uts sh -c \
        "hostname $host && exec /usr/sbin/sshd -f $STATE/sshd_config -o ListenAddress=$addr -o PidFile=$STATE/sshd-$host.pid"
}

start() {
    [[ $EUID -eq 0 ]] || { log "needs root"; exit 1; }
    install_packages "${PACKAGES[@]}"
    if ! answering; then
        stop
        check_subnet_free
        make_keys
        mkdir -p /run/sshd  # sshd's privilege-separation directory
        ip link add "$BRIDGE" type bridge
        ip addr add "$NET.254/24" dev "$BRIDGE"
        ip link set "$BRIDGE" up
        for host in "${HOSTS[@]}"; do make_host "$host"; done
        for _ in $(seq 50); do answering && break; sleep 0.1; done
        answering || { log "the hosts do not answer over ssh"; exit 1; }
    fi
    printf '%s\n' "${HOSTS[@]}"
}

stop() {
    local host
    for host in "${HOSTS[@]}"; do
        if [[ -f $STATE/sshd-$host.pid ]]; then
            kill "$(cat "$STATE/sshd-$host.pid")" 2>/dev/null || true
            rm -f "$STATE/sshd-$host.pid"
        fi
        # Whatever still runs inside the namespace (a straggling rank) goes with it.
        if ip netns pids "$host" >/dev/null 2>&1; then
            ip netns pids "$host" | xargs -r kill -9 2>/dev/null || true
            ip netns del "$host"
        fi
        # Deleting a namespace does not always take its veth pair along (gVisor keeps it).
        if ip link show "veth-$host" >/dev/null 2>&1; then ip link del "veth-$host"; fi
        rm -rf "/etc/netns/$host"
    done
    rmdir --ignore-fail-on-non-empty /etc/netns 2>/dev/null || true
    if ip link show "$BRIDGE" >/dev/null 2>&1; then ip link del "$BRIDGE"; fi
    rm -f "$SSH_CLIENT_CONF"
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
