"""The network lab: real ICE servers and real networks for tests and benchmarks.

loopback.py serves STUN on 127.0.0.1 (answering or dead); coturn.py runs Debian's coturn;
lab.py builds network namespaces with NATs between them (root only; 100.64.0.0/10 inside them).
"""
