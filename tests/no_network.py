"""The opening of a script run in a fresh interpreter with every network connection refused and recorded in
`attempts` (the integrations' tests load by name this way: a model cache must be read, never a hub). A script that
runs a stand-in for a hub on this machine (hub_stand_in.py) adds its host to `allowed`."""

REFUSE_NETWORK = r"""
import socket

attempts = []
allowed = set()

def guard(what, real):
    def guarded(sock, address, *rest):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in allowed:
            attempts.append(f"{what} {address}")
            raise OSError("network access in a no-network test")
        return real(sock, address, *rest)
    return guarded

def refuse_lookup(real):
    def lookup(host, *args, **kwargs):
        if host in allowed:
            return real(host, *args, **kwargs)
        attempts.append(f"getaddrinfo {host}")
        raise socket.gaierror("network access in a no-network test")
    return lookup

socket.socket.connect = guard("connect", socket.socket.connect)
socket.socket.connect_ex = guard("connect_ex", socket.socket.connect_ex)
socket.getaddrinfo = refuse_lookup(socket.getaddrinfo)
"""
