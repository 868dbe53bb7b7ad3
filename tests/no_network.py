"""The opening of a script run in a fresh interpreter with every network connection refused and recorded in
`attempts` (the integrations' tests load by name this way: a model cache must be read, never a hub)."""

REFUSE_NETWORK = r"""
import socket

attempts = []

def guard(what, real):
    def guarded(sock, address, *rest):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            attempts.append(f"{what} {address}")
            raise OSError("network access in a no-network test")
        return real(sock, address, *rest)
    return guarded

def no_lookup(host, *args, **kwargs):
    attempts.append(f"getaddrinfo {host}")
    raise socket.gaierror("network access in a no-network test")

socket.socket.connect = guard("connect", socket.socket.connect)
socket.socket.connect_ex = guard("connect_ex", socket.socket.connect_ex)
socket.getaddrinfo = no_lookup
"""
