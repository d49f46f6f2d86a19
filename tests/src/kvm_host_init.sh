#!/bin/busybox sh
# /init of the L1 KVM host (tests/src/kvm_host.rs): mounts this machine's root read-only over
# 9p under a tmpfs overlay, loads KVM and what pods use, runs the command in /out/cmd chrooted
# there with its output in /out/output and its exit status in /out/status, and powers off.
# While the command runs, /out/heartbeat is rewritten every few seconds (see `beat` below).
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

fail() {
    echo "kvm-host: $*"
    poweroff -f
}

modprobe -a virtio_pci 9pnet_virtio 9p overlay || fail "loading the 9p and overlay modules"
# Large messages: the test binaries and the guest image are read through this mount.
mount -t 9p -o ro,trans=virtio,version=9p2000.L,msize=1048576,cache=loose hostroot /host || fail "mounting the host's root"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=1048576 out /out || fail "mounting the run's directory"
. /out/env
mount --bind "/host$MODULES" /lib/modules || fail "binding the kernel's modules"
modprobe kvm_amd $KVM_AMD_PARAMS || fail "loading kvm_amd $KVM_AMD_PARAMS"
modprobe -a $HOST_MODULES || fail "loading $HOST_MODULES"
[ -c /dev/kvm ] || fail "no /dev/kvm after loading kvm_amd"

mount -t tmpfs -o mode=0755 upper /upper
mkdir -p /upper/data /upper/work
mount -t overlay overlay -o lowerdir=/host,upperdir=/upper/data,workdir=/upper/work /newroot || fail "mounting the overlay root"
r=/newroot
mount -t proc proc $r/proc
mount -t sysfs sysfs $r/sys
mount -t cgroup2 cgroup2 $r/sys/fs/cgroup
mount -t devtmpfs devtmpfs $r/dev
mkdir -p $r/dev/pts $r/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts $r/dev/pts
ln -sf pts/ptmx $r/dev/ptmx
mount -t tmpfs tmpfs $r/dev/shm
ln -sf /proc/self/fd $r/dev/fd
mount -t tmpfs -o mode=0755 tmpfs $r/run
mount -t tmpfs -o mode=1777 tmpfs $r/tmp
mkdir -p $r/run/kvm-host
mount --move /out $r/run/kvm-host
ip link set lo up
hostname kvm-host

o=$r/run/kvm-host
# What every process of L1 waits on, and where the pods and containerd were: written when the
# harness asks (a test that ran out of time in an L1 that still beats).
dump() {
    echo "uptime $(cat /proc/uptime) load $(cat /proc/loadavg)"
    for p in /proc/[0-9]*; do
        cmd=$(tr '\0' ' ' < $p/cmdline 2>/dev/null)
        [ -n "$cmd" ] || continue
        echo "== ${p#/proc/} $cmd"
        for t in $p/task/*; do
            state=$(grep '^State:' $t/status 2>/dev/null | cut -f2)
            echo "   ${t##*/} $(cat $t/comm 2>/dev/null) $state wchan=$(cat $t/wchan 2>/dev/null)"
            case "$state" in D*) sed 's/^/      /' $t/stack 2>/dev/null ;; esac
        done
    done
    for f in $(find $r/run/hull $r/tmp -name '*console.log' -o -name containerd.log 2>/dev/null); do
        echo "== $f (tail)"
        grep -v 'loading plugin' $f | tail -c 6000
    done
}
# The heartbeat: it stops only when L1's kernel, or QEMU's emulation under it, stops; a test
# that hangs in a live L1 keeps it going. The harness tells the two apart by it.
beat() {
    while :; do
        # Renamed into place: the harness never reads a half-written beat.
        cat /proc/uptime > $o/heartbeat.new && mv $o/heartbeat.new $o/heartbeat
        if [ -e $o/dump-request ] && [ ! -e $o/dump ]; then
            dump > $o/dump.partial 2>&1
            mv $o/dump.partial $o/dump
        fi
        sleep 3
    done
}
beat &

chroot $r /bin/sh /run/kvm-host/cmd > $o/output 2>&1
echo $? > $o/status
sync
poweroff -f
