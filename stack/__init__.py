"""mtcpshim's user-level TCP/IP stack: wire formats, TCP core, storage, interface, packet I/O."""
