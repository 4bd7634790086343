"""The default seccomp profile of `cafs run`: containerd's default, written from its
documented behaviour (containerd's `contrib/seccomp`, the profile Docker shares).

An allowlist: any syscall not named here fails with EPERM. What it keeps out of a container
that holds containerd's default capabilities (cafs/run/spec.py): new namespaces
(`unshare`, `setns`, `clone` with a CLONE_NEW* flag: a user namespace would give back every
capability, and with it `mount`), mounts, kernel keyrings, BPF, perf events,
userfaultfd, loading kernel modules or a new kernel, rebooting, swap, handle-based opens
(the "shocker" escape) and clock setting. A syscall that a capability exists for is allowed
when, and only when, the container is given that capability, as containerd does.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Collection
from typing import Any

EPERM = 1
ENOSYS = 38

# The host's architecture and the ones its kernel also runs binaries of (uname -m keys).
ARCHES = {
    "x86_64": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
    "aarch64": ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"],
    "arm64": ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"],
}

# Names another architecture lacks are skipped by runc (libseccomp cannot resolve them), so
# one list serves 32- and 64-bit callers alike.
ALLOWED = [
    # files and directories
    "access", "faccessat", "faccessat2", "open", "openat", "openat2", "creat", "close",
    "close_range", "read", "readv", "pread64", "preadv", "preadv2", "write", "writev",
    "pwrite64", "pwritev", "pwritev2", "lseek", "_llseek", "sendfile", "sendfile64",
    "copy_file_range", "splice", "tee", "vmsplice", "readahead", "fadvise64",
    "fadvise64_64", "fallocate", "truncate", "truncate64", "ftruncate", "ftruncate64",
    "fsync", "fdatasync", "sync", "syncfs", "sync_file_range", "flock", "fcntl", "fcntl64",
    "dup", "dup2", "dup3", "ioctl", "stat", "stat64", "lstat", "lstat64", "fstat", "fstat64",
    "fstatat64", "newfstatat", "statx", "statfs", "statfs64", "fstatfs", "fstatfs64",
    "getdents", "getdents64", "getcwd", "chdir", "fchdir", "mkdir", "mkdirat", "rmdir",
    "mknod", "mknodat", "link", "linkat", "symlink", "symlinkat", "readlink", "readlinkat",
    "rename", "renameat", "renameat2", "unlink", "unlinkat", "umask",
    "chmod", "fchmod", "fchmodat", "fchmodat2", "chown", "chown32", "fchown", "fchown32",
    "fchownat", "lchown", "lchown32", "utime", "utimes", "utimensat", "utimensat_time64",
    "futimesat", "getxattr", "lgetxattr", "fgetxattr", "setxattr", "lsetxattr", "fsetxattr",
    "listxattr", "llistxattr", "flistxattr", "removexattr", "lremovexattr", "fremovexattr",
    "inotify_init", "inotify_init1", "inotify_add_watch", "inotify_rm_watch",
    "fanotify_mark", "memfd_create", "memfd_secret", "cachestat",
    # asynchronous I/O and polling
    "io_setup", "io_destroy", "io_submit", "io_cancel", "io_getevents", "io_pgetevents",
    "io_pgetevents_time64", "ioprio_get", "ioprio_set", "poll", "ppoll", "ppoll_time64",
    "select", "_newselect", "pselect6", "pselect6_time64", "epoll_create", "epoll_create1",
    "epoll_ctl", "epoll_ctl_old", "epoll_wait", "epoll_wait_old", "epoll_pwait",
    "epoll_pwait2", "eventfd", "eventfd2", "signalfd", "signalfd4", "timerfd_create",
    "timerfd_settime", "timerfd_settime64", "timerfd_gettime", "timerfd_gettime64",
    "pipe", "pipe2",
    # memory
    "brk", "mmap", "mmap2", "munmap", "mremap", "mprotect", "madvise", "mincore", "msync",
    "mlock", "mlock2", "mlockall", "munlock", "munlockall", "remap_file_pages",
    "membarrier", "pkey_alloc", "pkey_free", "pkey_mprotect", "map_shadow_stack",
    # processes, threads, signals (clone: see CLONE_RULE)
    "execve", "execveat", "fork", "vfork", "exit", "exit_group", "wait4", "waitid",
    "waitpid", "kill", "tkill", "tgkill", "pidfd_open", "pidfd_send_signal",
    "process_mrelease", "rt_sigaction", "rt_sigprocmask", "rt_sigpending",
    "rt_sigqueueinfo", "rt_tgsigqueueinfo", "rt_sigreturn", "rt_sigsuspend",
    "rt_sigtimedwait", "rt_sigtimedwait_time64", "sigaltstack", "sigprocmask", "sigreturn",
    "pause", "restart_syscall", "set_tid_address", "set_robust_list", "get_robust_list",
    "rseq", "futex", "futex_time64", "futex_waitv", "futex_wait", "futex_wake",
    "futex_requeue", "get_thread_area", "set_thread_area", "prctl", "seccomp", "capget",
    "capset", "getrlimit", "setrlimit", "ugetrlimit", "prlimit64", "getrusage", "times",
    "getpriority", "setpriority", "getcpu", "sched_yield", "sched_getaffinity",
    "sched_setaffinity", "sched_getattr", "sched_setattr", "sched_getparam",
    "sched_setparam", "sched_getscheduler", "sched_setscheduler", "sched_get_priority_max",
    "sched_get_priority_min", "sched_rr_get_interval", "sched_rr_get_interval_time64",
    "landlock_create_ruleset", "landlock_add_rule", "landlock_restrict_self",
    # identity (what it may become is bounded by the capabilities)
    "getpid", "getppid", "gettid", "getpgid", "getpgrp", "setpgid", "getsid", "setsid",
    "getuid", "getuid32", "geteuid", "geteuid32", "getgid", "getgid32", "getegid",
    "getegid32", "getresuid", "getresuid32", "getresgid", "getresgid32", "getgroups",
    "getgroups32", "setuid", "setuid32", "setgid", "setgid32", "setreuid", "setreuid32",
    "setregid", "setregid32", "setresuid", "setresuid32", "setresgid", "setresgid32",
    "setfsuid", "setfsuid32", "setfsgid", "setfsgid32", "setgroups", "setgroups32",
    # time (reading it; setting it needs CAP_SYS_TIME)
    "time", "gettimeofday", "clock_gettime", "clock_gettime64", "clock_getres",
    "clock_getres_time64", "clock_nanosleep", "clock_nanosleep_time64", "nanosleep",
    "alarm", "getitimer", "setitimer", "timer_create", "timer_delete", "timer_getoverrun",
    "timer_gettime", "timer_gettime64", "timer_settime", "timer_settime64",
    "adjtimex", "clock_adjtime", "clock_adjtime64",
    # sockets
    "socket", "socketpair", "socketcall", "bind", "listen", "accept", "accept4",
    "connect", "getsockname", "getpeername", "getsockopt", "setsockopt", "shutdown",
    "send", "sendto", "sendmsg", "sendmmsg", "recv", "recvfrom", "recvmsg", "recvmmsg",
    "recvmmsg_time64",
    # System V and POSIX IPC (the container has its own IPC namespace)
    "ipc", "msgget", "msgsnd", "msgrcv", "msgctl", "semget", "semop", "semtimedop",
    "semtimedop_time64", "semctl", "shmget", "shmat", "shmdt", "shmctl", "mq_open",
    "mq_unlink", "mq_timedsend", "mq_timedsend_time64", "mq_timedreceive",
    "mq_timedreceive_time64", "mq_notify", "mq_getsetattr",
    # system information
    "uname", "sysinfo", "getrandom",
]

# Per machine (uname -m): what only that architecture has.
ARCH_ALLOWED = {
    "x86_64": ["arch_prctl", "modify_ldt"],
    "aarch64": ["arm_fadvise64_64", "arm_sync_file_range", "sync_file_range2",
                "breakpoint", "cacheflush", "set_tls"],
}
ARCH_ALLOWED["arm64"] = ARCH_ALLOWED["aarch64"]

# Allowed only to a container granted the capability (none but CAP_SYS_CHROOT is, by
# default). Without CAP_SYS_ADMIN, `clone` may not make namespaces and `clone3`, whose
# flags a filter cannot read, answers ENOSYS so that libc falls back to `clone`.
BY_CAPABILITY = {
    "CAP_DAC_READ_SEARCH": ["open_by_handle_at"],
    "CAP_SYS_ADMIN": ["bpf", "clone", "clone3", "fanotify_init", "fsconfig", "fsmount",
                      "fsopen", "fspick", "lookup_dcookie", "mount", "mount_setattr",
                      "move_mount", "name_to_handle_at", "open_tree", "perf_event_open",
                      "quotactl", "quotactl_fd", "setdomainname", "sethostname", "setns",
                      "syslog", "umount", "umount2", "unshare"],
    "CAP_SYS_BOOT": ["reboot"],
    "CAP_SYS_CHROOT": ["chroot"],
    "CAP_SYS_MODULE": ["delete_module", "init_module", "finit_module"],
    "CAP_SYS_PACCT": ["acct"],
    "CAP_SYS_PTRACE": ["kcmp", "pidfd_getfd", "process_madvise", "process_vm_readv",
                       "process_vm_writev", "ptrace"],
    "CAP_SYS_RAWIO": ["iopl", "ioperm"],
    "CAP_SYS_TIME": ["settimeofday", "stime", "clock_settime", "clock_settime64"],
    "CAP_SYS_TTY_CONFIG": ["vhangup"],
    "CAP_SYS_NICE": ["get_mempolicy", "mbind", "set_mempolicy", "set_mempolicy_home_node"],
    "CAP_SYSLOG": ["syslog"],
    "CAP_BPF": ["bpf"],
    "CAP_PERFMON": ["perf_event_open"],
}

# From Linux 4.8 a traced process cannot skip its seccomp filter, so ptrace and its kin are
# safe to allow without CAP_SYS_PTRACE; before, they only come with it.
PTRACE = ["kcmp", "process_vm_readv", "process_vm_writev", "ptrace"]
PTRACE_SAFE_FROM = (4, 8)

CLONE_NEW = {"CLONE_NEWNS": 0x00020000, "CLONE_NEWCGROUP": 0x02000000,
             "CLONE_NEWUTS": 0x04000000, "CLONE_NEWIPC": 0x08000000,
             "CLONE_NEWUSER": 0x10000000, "CLONE_NEWPID": 0x20000000,
             "CLONE_NEWNET": 0x40000000}

# personality(2): only the Linux personalities (and asking which one is set).
PERSONALITIES = [0x0, 0x0008, 0x20000, 0x20008, 0xFFFFFFFF]


def _rule(names: list[str], **extra: Any) -> dict[str, Any]:
    return {"names": names, "action": "SCMP_ACT_ALLOW", **extra}


def _kernel() -> tuple[int, int]:
    try:
        major, minor = os.uname().release.split(".")[:2]
        return int(major), int("".join(c for c in minor if c.isdigit()) or 0)
    except ValueError:
        return (0, 0)


def profile(capabilities: Collection[str], machine: str | None = None) -> dict[str, Any]:
    """The OCI `linux.seccomp` object for a container holding `capabilities`."""
    machine = machine or platform.machine()
    allowed = ALLOWED + ARCH_ALLOWED.get(machine, [])
    if _kernel() >= PTRACE_SAFE_FROM:
        allowed += PTRACE
    syscalls = [_rule(allowed)]
    syscalls += [_rule(["personality"], args=[{"index": 0, "value": p, "op": "SCMP_CMP_EQ"}])
                 for p in PERSONALITIES]
    granted = {name for cap in capabilities for name in BY_CAPABILITY.get(cap, [])}
    if granted - set(allowed):
        syscalls.append(_rule(sorted(granted - set(allowed))))
    if "CAP_SYS_ADMIN" not in capabilities:
        syscalls.append(_rule(["clone"], args=[{"index": 0, "value": sum(CLONE_NEW.values()),
                                                "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]))
        syscalls.append({"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": ENOSYS})
    return {"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": EPERM,
            "architectures": ARCHES.get(machine, []), "syscalls": syscalls}
