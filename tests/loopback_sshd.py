"""A real OpenSSH server on 127.0.0.1 for the SSH target's tests: host and client keys made here, nothing shared.

The device is this machine; the transport (key exchange, the remote shell, stdin/stdout over the
channel, the channel closing) is real.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


@dataclass
class Loopback:
    port: int
    user: str
    folder: Path
    config: Path  # an ssh client config: the client key, and the server's host key as the only known one
    proc: subprocess.Popen

    @property
    def address(self) -> str:
        return f"ssh://{self.user}@127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def available() -> str | None:
    """Why a loopback server cannot start here, or None."""
    if not os.path.exists(SSHD):
        return "no sshd (Debian: apt-get install openssh-server)"
    if not shutil.which("ssh") or not shutil.which("ssh-keygen"):
        return "no ssh client (Debian: apt-get install openssh-client)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)


BUSYBOX = shutil.which("busybox") or "/bin/busybox"
APPLETS = (
    "sh ash cat mkdir mv rm tar gzip wc tr test [ uname grep cut df awk tail echo sleep ls pwd chmod ln head env"
).split()


def bare_device_available() -> str | None:
    """Why a device with no Python and no libc cannot be made here, or None."""
    if os.geteuid() != 0:
        return "a chroot device (sshd's ChrootDirectory, /proc mounted in it) needs root"
    if (
        not os.path.exists(BUSYBOX)
        or "statically linked" not in subprocess.run(["file", "-L", BUSYBOX], capture_output=True, text=True).stdout
    ):
        return "no static busybox (Debian: apt-get install busybox-static)"
    return available()


def make_bare_root(root: Path) -> None:
    """A device that has a shell and nothing else: static busybox, /proc, /dev/null; no Python, no libc.

    sshd runs the login shell of the user (root's is /bin/bash) inside the chroot: a script hands over to sh.
    The chroot and its parents must be root's and not writable by others, as sshd checks.
    """
    for d in ("bin", "dev", "proc", "root", "tmp"):
        (root / d).mkdir(parents=True, mode=0o755)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    for applet in APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    (root / "bin" / "bash").write_text('#!/bin/sh\nexec /bin/sh "$@"\n')
    (root / "bin" / "bash").chmod(0o755)
    os.mknod(root / "dev" / "null", 0o666 | 0o020000, os.makedev(1, 3))
    subprocess.run(["mount", "-t", "proc", "proc", str(root / "proc")], check=True)


def remove_bare_root(root: Path) -> None:
    subprocess.run(["umount", "-l", str(root / "proc")], check=False)
    shutil.rmtree(root, ignore_errors=True)


def start(folder: Path, chroot: Path | None = None) -> Loopback:
    folder.mkdir(parents=True, exist_ok=True)
    for key in ("host_key", "client_key", "other_key"):
        _keygen(folder / key)
    (folder / "authorized_keys").write_text((folder / "client_key.pub").read_text())
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation folder, as root
    port = _free_port()
    (folder / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {folder / 'host_key'}\nPidFile {folder / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {folder / 'authorized_keys'}\nStrictModes no\nUsePAM no\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
        "PermitRootLogin prohibit-password\nLogLevel ERROR\nMaxStartups 50\nMaxSessions 50\n"
        + (f"ChrootDirectory {chroot}\n" if chroot else "")
    )
    host_pub = (folder / "host_key.pub").read_text().split()
    (folder / "known_hosts").write_text(
        f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n[localhost]:{port} {host_pub[0]} {host_pub[1]}\n"
    )
    (folder / "ssh_config").write_text(  # "localhost" names this server too: ssh://localhost in a report
        f"Host localhost\n  HostName 127.0.0.1\n  Port {port}\n"
        f"Host *\n  IdentityFile {folder / 'client_key'}\n  IdentitiesOnly yes\n"
        f"  UserKnownHostsFile {folder / 'known_hosts'}\n  StrictHostKeyChecking yes\n"
    )
    proc = subprocess.Popen(
        [SSHD, "-D", "-e", "-f", str(folder / "sshd_config")],
        stdout=subprocess.DEVNULL,
        stderr=open(folder / "sshd.log", "wb"),
    )
    for _ in range(200):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited: {(folder / 'sshd.log').read_text()[-500:]}")
        time.sleep(0.05)
    else:
        proc.kill()
        raise RuntimeError(f"sshd did not listen on 127.0.0.1:{port} within 10 s")
    return Loopback(port, getpass.getuser(), folder, folder / "ssh_config", proc)
