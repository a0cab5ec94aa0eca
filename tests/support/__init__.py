"""What the live tests and scripts/reliability.py share: test networks (the
shared mtcp-cli/mtcp-srv one and private ones under random names) with
their link faults (net), programs under `mtcpshim run` and kernel-side
servers (programs), byte-exact transfers with the counters read around
them (transfers), a packet I/O backend in memory for tests without a
device (link), frames made by hand (frames) and a classic BPF interpreter
for the packet filters (cbpf).  tests/conftest.py puts this package on the
path and holds the fixtures built from it."""
