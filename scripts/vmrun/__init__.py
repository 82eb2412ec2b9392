"""scripts/vm-run: run a command in a qemu VM whose kernel has a pure cgroup v2 hierarchy.

Modules: cli (arguments, exit codes), assets (qemu, cached kernel + initramfs), initramfs (module
dependencies, cpio), job (what the guest runs), machine (qemu and the output relay); init.sh is
the guest's PID 1.
"""
