"""Streaming: MRD wire codec, acquisition lines, slice assembly, image building. No sockets
in the pipeline stages themselves; the codec works on any object with ``recv_into``/``sendall``."""
