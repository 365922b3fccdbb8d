#!/bin/sh
# /init of the conntrack-trace test VM (built by xtask/src/vm/initramfs.rs,
# run by busybox sh as PID 1). Mounts what the tool and the tests need,
# loads the modules in dependency order, runs every scenario test binary
# single-threaded for the backend named on the kernel command line
# (ctt.backend=NAME), prints one marker line per test binary and one for the
# whole run, and powers off. The host (xtask/src/vm/qemu.rs) judges the run
# by these markers only; anything else on the console is for the log.
export PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root

say() { echo "ctt-vm: $*"; }

mount -t devtmpfs dev /dev
mount -t proc proc /proc
mount -t sysfs sys /sys
# `ip netns` keeps its namespaces under /run/netns; the tests' lock is
# /run/conntrack-trace-tests.lock; Rust's temp_dir() is /tmp.
mount -t tmpfs run /run
mount -t tmpfs tmp /tmp
mount -t bpf bpf /sys/fs/bpf
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null

arg() { sed -n "s/.*ctt\.$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
backend=$(arg backend)
overall=pass

say "kernel $(uname -r) backend ${backend:-default} cpus $(nproc)"
for m in $(cat /etc/ctt/modules); do
    if ! insmod "/lib/modules/ctt/$m.ko"; then
        say "insmod $m failed"
        overall=fail
    fi
done
ip link set lo up
# Whether this kernel keeps nf_conntrack_max per namespace: up to 7.3 it is
# one global, read-only in every namespace but the first
# (nf_conntrack_standalone.c, nf_conntrack_standalone_init_sysctl(): mode
# 0444 unless net_eq(&init_net, net)); a per-namespace max is writable there.
mode=$(unshare -n stat -c %a /proc/sys/net/netfilter/nf_conntrack_max 2>&1)
say "nf_conntrack_max in a child namespace: mode $mode"

export CONNTRACK_TRACE_BIN=/usr/local/bin/conntrack-trace
export CONNTRACK_TRACE_REQUIRE_ROOT=1
# Tests may leave out host tools the image does not carry (tshark), saying so.
export CONNTRACK_TRACE_VM=1
# "default": the binary's own default backend (no --backend flag passed).
if [ -n "$backend" ] && [ "$backend" != default ]; then
    export CONNTRACK_TRACE_BACKEND="$backend"
fi
# `vm-test --every-cell`: the tests that wait on the kernel run here too.
if [ "$(arg every_cell)" = 1 ]; then
    export CONNTRACK_TRACE_EVERY_CELL=1
fi

if [ "$overall" = pass ]; then
    for t in /tests/*; do
        name=${t##*/}
        say "test $name start"
        start=$(date +%s)
        "$t" --test-threads=1 --nocapture
        rc=$?
        secs=$(($(date +%s) - start))
        if [ "$rc" = 0 ]; then
            say "test $name pass ${secs}s"
        else
            say "test $name fail ${secs}s rc=$rc"
            overall=fail
        fi
    done
fi

say "result $overall"
sync
poweroff -f
