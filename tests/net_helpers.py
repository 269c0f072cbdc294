"""Which sockets a process tree listens on (Linux /proc), for the loopback-only checks."""

from __future__ import annotations

import ipaddress
import os
import socket


def process_tree(root: int) -> list[int]:
    """``root`` and every live descendant (by parent pid)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _socket_inodes(pids: list[int]) -> dict[int, int]:
    owner: dict[int, int] = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                owner[int(target[8:-1])] = pid
    return owner


def _address(hexaddr: str, v6: bool) -> tuple[str, int]:
    ip, port = hexaddr.split(":")
    raw = bytes.fromhex(ip)
    if v6:  # four host-order 32-bit words
        raw = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
        return socket.inet_ntop(socket.AF_INET6, raw), int(port, 16)
    return socket.inet_ntop(socket.AF_INET, raw[::-1]), int(port, 16)


def listening_sockets(root: int) -> list[tuple[str, str, int, int]]:
    """``(proto, ip, port, pid)`` of every TCP socket in LISTEN state and every bound UDP
    socket owned by a process in ``root``'s tree."""
    owner = _socket_inodes(process_tree(root))
    found = []
    for proto, v6 in (("tcp", False), ("tcp6", True), ("udp", False), ("udp6", True)):
        try:
            fh = open(f"/proc/net/{proto}")
        except OSError:
            continue
        with fh:
            next(fh)
            for line in fh:
                f = line.split()
                state, inode = f[3], int(f[9])
                if inode in owner and (state == "0A" or proto.startswith("udp")):
                    ip, port = _address(f[1], v6)
                    found.append((proto, ip, port, owner[inode]))
    return sorted(found)


def is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback
