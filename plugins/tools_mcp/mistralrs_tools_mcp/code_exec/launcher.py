"""The first process of a sandbox (run as ``python -I -S launcher.py CONFIG_JSON``; the
standard library only, nothing of the package is imported here).

In order: drop root to an unprivileged user when that user can run the interpreter (so
``RLIMIT_NPROC`` binds, the kernel exempts root from it, and the code cannot write root's
files); unshare a user, network and PID namespace (no network: the new network namespace
has no interface but a loopback, down unless the policy says "loopback", and never the
host's); set the rlimits; fork PID 1 of the new PID namespace (``PR_SET_PDEATHSIG``: it,
and with it everything in the namespace, dies with this process), which forks the
interpreter and reports its exit status. Exit status 97 means the sandbox could not be
set up; the reason is the last line of stderr, prefixed ``SANDBOX:``.
"""
import ctypes
import fcntl
import json
import os
import resource
import signal
import socket
import stat
import struct
import sys

CLONE_NEWUSER, CLONE_NEWNET, CLONE_NEWPID = 0x10000000, 0x40000000, 0x20000000
PR_SET_PDEATHSIG = 1
SETUP_FAILED = 97


def fail(reason):
    sys.stderr.write("SANDBOX: " + reason + "\n")
    sys.stderr.flush()
    os._exit(SETUP_FAILED)


def write(path, text):
    with open(path, "w") as fh:
        fh.write(text)


def loopback_up():
    # SIOCGIFFLAGS / SIOCSIFFLAGS on "lo": set IFF_UP (the namespace's own loopback).
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        req = struct.pack("16sh", b"lo", 0)
        flags = struct.unpack("16sh", fcntl.ioctl(s.fileno(), 0x8913, req))[1]
        fcntl.ioctl(s.fileno(), 0x8914, struct.pack("16sh", b"lo", flags | 1))
    finally:
        s.close()


def others_can_run(path):
    """Whether a user with no rights of its own can run ``path`` (every directory on the way
    searchable by others, the file readable and executable by others), and read the
    standard library beside it."""
    path = os.path.realpath(path)
    prefix = os.path.dirname(os.path.dirname(path))
    for p in (path, os.path.join(prefix, "lib")):
        parts = p.split(os.sep)
        for i in range(2, len(parts)):
            try:
                if not os.stat(os.sep.join(parts[:i])).st_mode & stat.S_IXOTH:
                    return False
            except OSError:
                return p != path   # no lib folder beside it: judge by the binary alone
    mode = os.stat(path).st_mode
    return bool(mode & stat.S_IXOTH and mode & stat.S_IROTH)


def processes_of(uid):
    n = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat("/proc/" + entry).st_uid == uid:
                    n += 1
            except OSError:
                pass
    return n


def main():
    cfg = json.loads(sys.argv[1])
    libc = ctypes.CDLL(None, use_errno=True)
    if cfg["drop_to"] is not None:
        try:
            os.setgroups([])
            os.setgid(cfg["drop_to"])
            os.setuid(cfg["drop_to"])
        except OSError as exc:
            fail("cannot drop root privileges to uid %d: %s" % (cfg["drop_to"], exc))
    uid, gid = os.getuid(), os.getgid()
    network = cfg["network"]
    flags = CLONE_NEWUSER | CLONE_NEWPID | (0 if network == "full" else CLONE_NEWNET)
    if libc.unshare(flags) != 0:
        err = ctypes.get_errno()
        # Without a PID namespace the rlimits and the process-group kill still bound the
        # code (not strict); without the network namespace no code runs.
        if not cfg["strict"] and libc.unshare(flags & ~CLONE_NEWPID) == 0:
            flags &= ~CLONE_NEWPID
        elif network == "full" and not cfg["strict"]:
            flags = 0
        else:
            fail("cannot create a %s here (unshare: %s); no code runs without it" % (
                "network namespace" if network != "full" else "user and PID namespace", os.strerror(err)))
    if flags:
        try:
            write("/proc/self/setgroups", "deny")
            write("/proc/self/uid_map", "%d %d 1" % (uid, uid))
            write("/proc/self/gid_map", "%d %d 1" % (gid, gid))
        except OSError as exc:
            fail("cannot map the user into its namespace: %s" % exc)
    if network == "loopback":
        try:
            loopback_up()
        except OSError as exc:
            fail("cannot bring up the sandbox's loopback interface: %s" % exc)
    lim = cfg["limits"]
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_AS, (lim["as"], lim["as"]))
        resource.setrlimit(resource.RLIMIT_CPU, (lim["cpu"], lim["cpu"] + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (lim["fsize"], lim["fsize"]))
        resource.setrlimit(resource.RLIMIT_NOFILE, (lim["nofile"], lim["nofile"]))
        # RLIMIT_NPROC counts every process of the user: the ones it has now, plus the budget.
        nproc = processes_of(uid) + lim["nproc"]
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    except (ValueError, OSError) as exc:
        fail("cannot set resource limits: %s" % exc)
    pid = os.fork()
    if pid == 0:
        # PID 1 of the namespace: it dies with the launcher, and the namespace with it. The
        # code runs in its child: the kernel ignores default-action signals, SIGXCPU
        # included, sent to a namespace's PID 1.
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        code = os.fork()
        if code == 0:
            try:
                os.chdir(cfg["cwd"])
                os.execve(cfg["python"], [cfg["python"], "-I", cfg["script"]], cfg["env"])
            except OSError as exc:
                sys.stderr.write("SANDBOX: cannot start the interpreter %r: %s\n" % (cfg["python"], exc))
            os._exit(SETUP_FAILED)
        os._exit(wait_status(code))
    os._exit(wait_status(pid))


def wait_status(pid):
    """The exit status of ``pid`` as a shell reports it (128 + signal when killed)."""
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


if __name__ == "__main__":
    main()
