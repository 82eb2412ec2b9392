#!/bin/busybox sh
# Guest PID 1 for scripts/vm-run (busybox ash).
#
# Stage 1 runs from the initramfs: it loads the kernel modules listed in /modules/order, mounts
# the host's root filesystem read-only over 9p at /newroot, lays writable tmpfs-backed overlays
# over the directories named by the job, mounts proc, sysfs, devtmpfs and a pure cgroup2
# hierarchy, then switches root and runs itself again as stage 2.
#
# Stage 2 runs on the host's root: it brings up the network, formats and mounts the scratch
# disk, reports "booted" on the status port, runs the job's command with its stdout and stderr
# on their own virtio ports, reports "exit N" and powers the VM off.
#
# The job comes from the host as two shell files in a run directory whose path is on the kernel
# command line (jobworker.job=DIR): job.sh sets JOB_* variables and the command's arguments
# (set -- ...), env.sh exports the command's environment.

RUN=/run/vmrun
DISK_MOUNT=/mnt/vmdisk

say() {
    echo "vm-run init: $*" >/dev/console
}

# Report a setup failure to the host (when the status port exists) and stop the VM.
fail() {
    say "error: $*"
    if [ -n "$STATUS_PORT" ]; then
        echo "error $*" >"$STATUS_PORT"
    fi
    poweroff -f
    reboot -f
}

# Every process's state, what it waits for in the kernel and its kernel stack: what a command
# that hangs was doing when the host's timeout is near.
report_processes() {
    echo "vm-run: the command still runs after $JOB_REPORT_AFTER s; the guest's processes:"
    for dir in /proc/[0-9]*; do
        [ "$(cat "$dir/cmdline" 2>/dev/null)" ] || continue
        echo "--- pid ${dir#/proc/}: $(tr '\0' ' ' <"$dir/cmdline" | cut -c1-300)"
        grep -E '^(State|PPid|Threads)' "$dir/status"
        for task in "$dir"/task/*; do
            echo "  task ${task##*/} waits in $(cat "$task/wchan" 2>/dev/null)"
            sed 's/^/    /' "$task/stack" 2>/dev/null
        done
    done
}

# Print the /dev path of the virtio port with the given name; waits for it to appear.
find_port() {
    tries=0
    while [ "$tries" -lt 100 ]; do
        for dir in /sys/class/virtio-ports/*; do
            if [ "$(cat "$dir/name" 2>/dev/null)" = "$1" ]; then
                echo "/dev/${dir##*/}"
                return 0
            fi
        done
        tries=$((tries + 1))
        usleep 50000
    done
    return 1
}

job_dir_from_cmdline() {
    for arg in $(cat /proc/cmdline); do
        case "$arg" in
            jobworker.job=*) echo "${arg#jobworker.job=}" ;;
        esac
    done
}

# Overlay a writable tmpfs-backed layer (/ovl/$2) over /newroot$1; the host's directory stays
# untouched.
overlay() {
    mkdir -p "/ovl/$2/upper" "/ovl/$2/work"
    mount -t overlay overlay \
        -o "lowerdir=/newroot$1,upperdir=/ovl/$2/upper,workdir=/ovl/$2/work" \
        "/newroot$1" || fail "overlay on $1"
}

stage1() {
    /bin/busybox mkdir -p /bin /proc /sys /dev /newroot /ovl
    /bin/busybox --install -s /bin
    export PATH=/bin
    mount -t devtmpfs devtmpfs /dev
    mount -t proc proc /proc
    mount -t sysfs sysfs /sys

    for module in $(cat /modules/order); do
        insmod "/modules/$module.ko" || fail "insmod $module"
    done
    STATUS_PORT=$(find_port jobworker.status) || fail "no status port"

    mount -t 9p -o ro,trans=virtio,version=9p2000.L,msize=512000,cache=loose hostroot /newroot \
        || fail "mount of the host root over 9p"
    job_dir=$(job_dir_from_cmdline)
    [ -n "$job_dir" ] || fail "no jobworker.job= on the kernel command line"
    [ -r "/newroot$job_dir/job.sh" ] || fail "cannot read $job_dir/job.sh"
    . "/newroot$job_dir/job.sh"

    mount -t tmpfs -o mode=0755 tmpfs /ovl
    layer=0
    for dir in $JOB_OVERLAYS; do
        layer=$((layer + 1))
        overlay "$dir" "$layer"
    done

    mount -t tmpfs -o mode=0755 tmpfs /newroot/run
    mkdir -p "/newroot$RUN/bin"
    cp /bin/busybox /init "/newroot$job_dir/job.sh" "/newroot$job_dir/env.sh" "/newroot$RUN/" \
        || fail "copying the job into the guest's /run"

    mount --move /dev /newroot/dev
    mkdir -p /newroot/dev/pts /newroot/dev/shm
    mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /newroot/dev/pts
    mount -t tmpfs -o mode=1777 tmpfs /newroot/dev/shm
    mount --move /proc /newroot/proc
    mount --move /sys /newroot/sys
    mount -t cgroup2 cgroup2 /newroot/sys/fs/cgroup || fail "mount of cgroup2"
    echo "+cpu +io +memory +pids" >/newroot/sys/fs/cgroup/cgroup.subtree_control \
        || fail "enabling cgroup controllers"

    exec switch_root /newroot "$RUN/busybox" sh "$RUN/init" stage2
}

stage2() {
    "$RUN/busybox" --install -s "$RUN/bin"
    export PATH="$RUN/bin"
    STATUS_PORT=$(find_port jobworker.status) || fail "no status port after switch_root"
    out_port=$(find_port jobworker.stdout) || fail "no stdout port"
    err_port=$(find_port jobworker.stderr) || fail "no stderr port"
    . "$RUN/job.sh"

    hostname jobworker-vm
    ip link set lo up || fail "loopback up"
    if [ "$JOB_NET" = 1 ]; then
        ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 \
            && ip route add default via 10.0.2.2 || fail "network setup"
    fi
    if [ "$JOB_DISK" = 1 ]; then
        mke2fs -q /dev/vda >/dev/console 2>&1 || fail "mke2fs /dev/vda"
        mkdir -p "$DISK_MOUNT"
        mount -t ext2 /dev/vda "$DISK_MOUNT" || fail "mount /dev/vda"
        {
            echo "export JOBWORKER_VM_DISK=$DISK_MOUNT"
            echo "export JOBWORKER_VM_DISK_DEV=$(cat /sys/block/vda/dev)"
        } >>"$RUN/env.sh"
    fi

    cd "$JOB_CWD" || fail "cd $JOB_CWD"
    echo booted >"$STATUS_PORT"
    # The command's own shell redirects its stdio: a redirection here would also catch this
    # shell's "Killed" notice when a signal ends the command.
    # A virtio port opens once at a time: the command and the reporter share this shell's
    # descriptor 4 for stderr (the command itself gets it as 2 only).
    exec 4>"$err_port"
    redirect="</dev/null >$out_port 2>&4 4>&-"
    reporter=
    if [ "${JOB_REPORT_AFTER:-0}" -gt 0 ]; then
        (sleep "$JOB_REPORT_AFTER" && report_processes >&4 2>&1) &
        reporter=$!
    fi
    env -i "$RUN/busybox" sh -c ". $RUN/env.sh && exec \"\$@\" $redirect" vm-run "$@"
    echo "exit $?" >"$STATUS_PORT"
    [ -z "$reporter" ] || kill "$reporter" 2>/dev/null
    sync
    poweroff -f
    reboot -f
}

if [ "$1" = stage2 ]; then
    stage2
else
    stage1
fi
