"""Everyday servers under the stack, each as its users run it, driven by
the kernel's clients in the client namespace: byte-exact bodies and
error-free loads (the short variant of issue 13's program matrix;
README, "Programs run under the stack")."""
import os
import pathlib
import pwd
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

from mtcpshim import launcher
from support.net import NET, SERVER_PORT, in_client
from support.programs import ShimProgram, run_under_shim, wait_until
from support.transfers import sha256_of
from test_daemons import detached_stack, stack_serves

SERVER = f"http://{NET.srv_ip}:{SERVER_PORT}"


def needs(*programs):
    missing = [name for name in programs if shutil.which(name) is None]
    return pytest.mark.skipif(bool(missing), reason=f"not installed: {', '.join(missing)}")


def ab(url: str, requests: int, concurrency: int, keepalive: bool = False) -> str:
    """ApacheBench from the client's kernel; its report, checked error-free."""
    done = in_client(["ab", "-q", "-r", "-s", "20", "-n", str(requests), "-c", str(concurrency)]
                     + (["-k"] if keepalive else []) + [url], timeout=180, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    report = done.stdout
    assert re.search(rf"^Complete requests:\s+{requests}$", report, re.M), report
    assert re.search(r"^Failed requests:\s+0$", report, re.M), report
    assert "Non-2xx responses" not in report, report
    return report


def download_digest(url: str, tmp_path) -> str:
    out = tmp_path / "download"
    done = in_client(["curl", "-sS", "--fail", "-m", "60", "-o", str(out), url], timeout=90, text=True)
    assert done.returncode == 0, done.stderr
    return sha256_of(out)


@pytest.fixture
def public_docroot(docroot):
    """The site where a worker that dropped to nobody can read it
    (/tmp/pytest-of-root is root's alone)."""
    top = tempfile.mkdtemp(prefix="mtcpshim-site-")
    try:
        os.chmod(top, 0o755)
        site = pathlib.Path(top, "site")
        shutil.copytree(docroot, site, copy_function=shutil.copyfile)
        site.chmod(0o755)
        yield site
    finally:
        shutil.rmtree(top)


@needs("nginx")
def test_nginx_daemonized_with_two_workers(test_network, public_docroot, tmp_path):
    """nginx as shipped: it daemonizes (`daemon on`) and its two workers,
    dropped to nobody, accept from the listener the master opened."""
    docroot = public_docroot
    conf = tmp_path / "nginx.conf"
    temp = tmp_path / "temp"
    conf.write_text(f"""
worker_processes 2;
pid {tmp_path}/nginx.pid;
error_log {tmp_path}/error.log;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    client_body_temp_path {temp}; proxy_temp_path {temp}; fastcgi_temp_path {temp};
    uwsgi_temp_path {temp}; scgi_temp_path {temp};
    server {{ listen {SERVER_PORT}; root {docroot}; }}
}}
""")
    with detached_stack() as started:
        done = run_under_shim(["nginx", "-c", str(conf)], timeout=60)
        assert done.returncode == 0, done.stderr
        wait_until((tmp_path / "nginx.pid").exists, 20, "nginx to write its pid file")
        started.append(int((tmp_path / "nginx.pid").read_text()))
        assert download_digest(f"{SERVER}/large.bin", tmp_path) == sha256_of(docroot / "large.bin")
        ab(f"{SERVER}/small.txt", 5000, 32, keepalive=True)
        ab(f"{SERVER}/small.txt", 2000, 16)
        subprocess.run(["nginx", "-c", str(conf), "-s", "quit"], check=True, capture_output=True, timeout=30)
        wait_until(lambda: not stack_serves(), 30, "the stack to stop once nginx quit")
        os.unlink(launcher.runtime_path(NET.srv_ns, NET.srv_if, "log"))


# The backend on the client's kernel: http.server with a listen backlog to
# match haproxy's bursts (socketserver's own is 5: its SYN drops stalled
# requests for a second each, on the kernel's side).
KERNEL_BACKEND = """
import http.server, functools, sys
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=sys.argv[3])
http.server.ThreadingHTTPServer.request_queue_size = 1024
http.server.ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), handler).serve_forever()
"""


@pytest.fixture
def kernel_backend(test_network, docroot, tmp_path):
    port = 8000
    with open(tmp_path / "backend.log", "wb") as log:
        server = subprocess.Popen(["ip", "netns", "exec", NET.cli_ns, sys.executable, "-c", KERNEL_BACKEND,
                                   NET.cli_ip, str(port), str(docroot)], stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://{NET.cli_ip}:{port}"
            wait_until(lambda: in_client(["curl", "-s", "-m", "2", f"{url}/small.txt"]).returncode == 0, 20,
                       "the kernel's backend")
            yield url
        finally:
            server.terminate()
            server.wait(10)


@needs("haproxy")
def test_haproxy_in_tcp_mode_between_kernel_client_and_kernel_backend(test_network, kernel_backend, docroot,
                                                                      tmp_path):
    """Each client connection accepted by the stack and one opened by the
    stack to the kernel's backend, in one event loop."""
    kernel_url = kernel_backend
    conf = tmp_path / "haproxy.cfg"
    conf.write_text(f"""
global
    maxconn 1000
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend front
    bind 0.0.0.0:{SERVER_PORT}
    default_backend kernel
backend kernel
    server python {kernel_url.removeprefix("http://")}
""")
    proxy = ShimProgram(["haproxy", "-db", "-f", str(conf)], tmp_path / "haproxy.log")
    try:
        proxy.stack_pid()
        wait_until(lambda: in_client(["curl", "-s", "-m", "2", f"{SERVER}/small.txt"]).returncode == 0, 20,
                   "haproxy to listen")
        assert download_digest(f"{SERVER}/large.bin", tmp_path) == sha256_of(docroot / "large.bin")
        ab(f"{SERVER}/small.txt", 500, 8)
    finally:
        proxy.stop()


@needs("gunicorn")
def test_gunicorn_pre_forked_workers(test_network, tmp_path):
    """gunicorn's master binds, forks two sync workers that accept from its
    listener; both serve."""
    (tmp_path / "app.py").write_text(
        "def app(environ, start_response):\n"
        "    body = b'gunicorn'\n"
        "    start_response('200 OK', [('Content-Length', str(len(body)))])\n"
        "    return [body]\n")
    log = tmp_path / "access.log"
    server = ShimProgram([shutil.which("gunicorn"), "--workers", "2", "--bind", f"0.0.0.0:{SERVER_PORT}",
                          "--chdir", str(tmp_path), "--access-logfile", str(log),
                          "--access-logformat", "%(p)s %(s)s", "app:app"], tmp_path / "gunicorn.log")
    try:
        server.stack_pid()
        wait_until(lambda: in_client(["curl", "-s", "-m", "2", f"{SERVER}/"]).stdout == b"gunicorn", 30,
                   "gunicorn's workers to serve")
        ab(f"{SERVER}/", 2000, 10)
        wait_until(lambda: len(log.read_text().splitlines()) >= 2001, 10, "the access log")
        workers = {line.split()[0] for line in log.read_text().splitlines()}
        assert {line.split()[1] for line in log.read_text().splitlines()} == {"200"}
        assert len(workers) == 2, workers
    finally:
        server.stop()


@pytest.fixture
def postgres_data():
    """A new cluster owned by the postgres user (trust for the test network)."""
    try:
        user = pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("no postgres user (apt-get install postgresql)")
    bindir = next((f"/usr/lib/postgresql/{v}/bin" for v in sorted(os.listdir("/usr/lib/postgresql"), reverse=True)
                   if os.path.exists(f"/usr/lib/postgresql/{v}/bin/postgres")), None) \
        if os.path.isdir("/usr/lib/postgresql") else None
    if bindir is None:
        pytest.skip("PostgreSQL's server is not installed")
    top = tempfile.mkdtemp(prefix="mtcpshim-pg-")  # /tmp/pytest-of-root is root's alone
    try:
        os.chmod(top, 0o755)
        data = os.path.join(top, "data")
        os.mkdir(data, 0o700)
        os.chown(data, user.pw_uid, user.pw_gid)
        subprocess.run(["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups",
                        f"{bindir}/initdb", "-D", data, "-A", "trust", "-U", "postgres"],
                       check=True, capture_output=True, timeout=120, cwd="/")
        with open(os.path.join(data, "pg_hba.conf"), "a") as hba:
            hba.write(f"host all all {NET.cli_ip}/32 trust\n")
        yield bindir, data
    finally:
        shutil.rmtree(top)


@needs("pgbench")
def test_postgresql_with_pgbench(test_network, postgres_data, tmp_path):
    """PostgreSQL forks a backend for each connection, dropped to the
    postgres user; pgbench runs transactions, then a new connection for
    each one."""
    bindir, data = postgres_data
    server = ShimProgram([f"{bindir}/postgres", "-D", data, "-c", "listen_addresses=0.0.0.0",
                          "-c", f"port={SERVER_PORT}", "-c", f"unix_socket_directories={data}",
                          "-c", "fsync=off", "-c", "shared_buffers=32MB"], tmp_path / "postgres.log",
                         options=["--user", "postgres"])
    pgbench = ["pgbench", "-h", NET.srv_ip, "-p", str(SERVER_PORT), "-U", "postgres"]
    try:
        server.stack_pid()
        wait_until(lambda: "ready to accept connections" in server.output(), 30, "postgres to start")
        init = in_client(pgbench + ["-i", "-s", "1", "postgres"], timeout=120, text=True)
        assert init.returncode == 0, init.stderr
        for run in (["-c", "4", "-j", "2", "-t", "200"], ["-c", "4", "-j", "2", "-t", "25", "-C", "-S"]):
            done = in_client(pgbench + run + ["postgres"], timeout=180, text=True)
            assert done.returncode == 0, done.stdout + done.stderr
            expected = 4 * int(run[run.index("-t") + 1])
            assert f"number of transactions actually processed: {expected}/{expected}" in done.stdout, done.stdout
            assert "number of failed transactions: 0 " in done.stdout, done.stdout
    finally:
        server.stop()


@needs("redis-server", "redis-cli")
def test_redis_cli_as_a_client_of_a_kernel_redis(test_network, tmp_path):
    port = "6379"
    server = subprocess.Popen(["ip", "netns", "exec", NET.cli_ns, "redis-server", "--port", port,
                               "--bind", NET.cli_ip, "--protected-mode", "no", "--save", "", "--appendonly", "no",
                               "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        cli = ["redis-cli", "-h", NET.cli_ip, "-p", port]
        wait_until(lambda: in_client(cli + ["ping"]).stdout == b"PONG\n", 20, "redis on the kernel")
        value = os.urandom(48 * 1024).hex()                 # 96 KB: more than one window's first flight
        assert run_under_shim(cli + ["set", "key", value]).stdout.strip() == "OK"
        fetched = run_under_shim(cli + ["get", "key"])
        assert fetched.returncode == 0 and fetched.stdout.strip() == value
    finally:
        server.terminate()
        server.wait(10)


ECHO_CLIENT = """
import os, socket, sys, threading
data = os.urandom(1 << 20)
conn = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
received = bytearray()
def read_all():
    while chunk := conn.recv(65536):
        received.extend(chunk)
reader = threading.Thread(target=read_all)
reader.start()
conn.sendall(data)
conn.shutdown(socket.SHUT_WR)
reader.join(60)
print("echoed", bytes(received) == data, len(received))
"""


@needs("socat")
def test_socat_forks_a_child_per_connection(test_network, tmp_path):
    """socat's `fork`: the listener's process forks for each connection and
    the child serves it (here with `cat` behind it) while the parent goes on
    accepting."""
    server = ShimProgram(["socat", f"TCP-LISTEN:{SERVER_PORT},fork,reuseaddr", "EXEC:cat"], tmp_path / "socat.log")
    try:
        server.stack_pid()
        for _ in range(3):
            done = in_client([sys.executable, "-c", ECHO_CLIENT, NET.srv_ip, str(SERVER_PORT)], timeout=90, text=True)
            assert done.stdout.strip() == f"echoed True {1 << 20}", done.stdout + done.stderr
    finally:
        server.stop()


MEMCACHED_CLIENT = """
import os, socket, sys
conns = [socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30) for _ in range(8)]
matched = 0
for i in range(2000):
    conn = conns[i % 8]
    value = os.urandom(100).hex().encode()
    conn.sendall(b"set k%d 0 0 %d\\r\\n%s\\r\\n" % (i, len(value), value))
    assert conn.recv(100) == b"STORED\\r\\n"
    conn.sendall(b"get k%d\\r\\n" % i)
    reply = b""
    while not reply.endswith(b"END\\r\\n"):
        reply += conn.recv(4096)
    matched += value in reply
print("matched", matched)
"""


@needs("memcached")
def test_memcached_threads_dropped_to_nobody(test_network, tmp_path):
    server = ShimProgram(["memcached", "-u", "nobody", "-p", str(SERVER_PORT), "-l", "0.0.0.0", "-t", "2"],
                         tmp_path / "memcached.log")
    try:
        server.stack_pid()
        wait_until(lambda: in_client(["bash", "-c", f"exec 3<>/dev/tcp/{NET.srv_ip}/{SERVER_PORT}"]).returncode == 0,
                   20, "memcached to listen")
        done = in_client([sys.executable, "-c", MEMCACHED_CLIENT, NET.srv_ip, str(SERVER_PORT)], timeout=120,
                         text=True)
        assert done.stdout.strip() == "matched 2000", done.stdout + done.stderr
    finally:
        server.stop()
