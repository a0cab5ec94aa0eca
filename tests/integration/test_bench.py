"""`mtcpshim bench`: both stacks measured for every workload, the JSON and
the PNG written, and the network restored even when the bench is
interrupted.  No test asserts a speed."""
import contextlib
import json
import os
import signal
import sys
import uuid
import subprocess
import time

import psutil
import pytest

from mtcpshim import testnet
from mtcpshim.bench import report, workloads
from mtcpshim.bench.runner import DISTURBED_RETRIES, RunRecord, Settings
from support.net import NET
from support.programs import mtcpshim_command, wait_until

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
QUICK_TIMEOUT = 120
# Every process the bench starts (servers, clients, the stack process)
# inherits its environment; this variable tells them from anyone else's.
MARK = "MTCPSHIM_BENCH_TEST"


def bench_command(*args, mark: str) -> dict:
    env = dict(os.environ, **{MARK: mark})
    return {"args": mtcpshim_command("bench", *args), "env": env}


def marked(mark: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if process.environ().get(MARK) == mark:
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


def processes_marked(mark: str) -> list[str]:
    return [" ".join(process.info["cmdline"] or []) for process in marked(mark)]


def stop(bench: subprocess.Popen, mark: str) -> None:
    """Whatever happened in the test: the bench interrupted as a user
    would (it tears down its servers and the network), killed if it will
    not go, and nothing it started left running."""
    if bench.poll() is None:
        bench.send_signal(signal.SIGINT)
        try:
            bench.wait(timeout=60)
        except subprocess.TimeoutExpired:
            bench.kill()
            bench.wait()
    for process in marked(mark):
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


def kernel_addresses_on_stack_side() -> list[str]:
    return testnet.status()["links"][NET.srv_if]["addresses"]


def throughput(run: dict) -> float | None:
    return run["requests_per_s"] if run["requests"] is not None else run["gbit_per_s"]


def test_quick_bench_measures_every_workload_on_both_stacks_and_draws_them(test_network, tmp_path):
    mark = uuid.uuid4().hex
    json_path, png_path = tmp_path / "bench.json", tmp_path / "bench.png"

    bench = subprocess.Popen(**bench_command("--quick", "--json", str(json_path), "--plot", str(png_path), mark=mark),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = bench.communicate(timeout=QUICK_TIMEOUT)
    finally:
        stop(bench, mark)     # a bench that overran leaves no server behind for the next test

    assert bench.returncode == 0, stdout + stderr
    document = json.loads(json_path.read_text())
    measured = {(run["workload"], run["stack"]): run for run in document["runs"]}
    for workload in workloads.WORKLOADS:
        for stack in ("kernel", "shim"):
            run = measured[(workload.name, stack)]
            assert throughput(run) and throughput(run) > 0, run
            assert run["server_cpu_s"] > 0 and run["machine_cpu_s"] > 0, run
            assert f"| {workload.label} | kernel |" in stdout
    assert document["machine"]["cpus"] >= 2 and document["machine"]["lighttpd"].startswith("lighttpd/")
    assert "| shim/kernel |" in stdout

    png = png_path.read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > len(PNG_SIGNATURE)
    assert b"Matplotlib" in png  # the Software text chunk matplotlib writes

    assert kernel_addresses_on_stack_side() == []
    assert processes_marked(mark) == []


@pytest.mark.parametrize("interrupt_when", ["kernel stack serving", "shim stack serving"])
def test_ctrl_c_mid_run_stops_everything_and_removes_the_kernel_address(test_network, interrupt_when):
    mark = uuid.uuid4().hex
    # 10 s runs: this test's own polling for the processes is CPU outside
    # the bench, so a kernel run may be measured 1 + DISTURBED_RETRIES times
    # before the shim's stack starts.
    bench = subprocess.Popen(**bench_command("--workload", "keepalive", "--duration", "10", "--runs", "1", mark=mark),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        if interrupt_when == "kernel stack serving":
            wait_until(lambda: kernel_addresses_on_stack_side() == [f"{NET.srv_ip}/{NET.prefix}"], 30,
                       "the kernel address on the stack side")
        else:
            wait_until(lambda: any("mtcpshim.stackd" in command for command in processes_marked(mark)), 90,
                       "the stack process")
        time.sleep(1)  # into the load interval

        bench.send_signal(signal.SIGINT)
        _, stderr = bench.communicate(timeout=60)
    finally:
        stop(bench, mark)

    assert bench.returncode == 130, stderr
    assert "interrupted" in stderr
    assert kernel_addresses_on_stack_side() == []
    assert processes_marked(mark) == []


def test_a_run_another_process_disturbs_is_reported_invalid(test_network, tmp_path):
    """A CPU hog that is none of the bench's own processes: every run it
    overlaps is measured again, then left out of the medians, and says who
    took the CPU."""
    mark = uuid.uuid4().hex
    json_path = tmp_path / "bench.json"
    hog = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 90\n"
                            "while time.time() < end:\n    pass"])
    try:
        done = subprocess.run(**bench_command("--workload", "latency", "--quick", "--json", str(json_path),
                                              mark=mark), capture_output=True, text=True, timeout=QUICK_TIMEOUT)
    finally:
        hog.kill()
        hog.wait()

    assert done.returncode == 0, done.stdout + done.stderr
    runs = json.loads(json_path.read_text())["runs"]
    assert {run["stack"] for run in runs} == {"kernel", "shim"}
    for run in runs:
        assert not run["valid"] and run["foreign_cpu_s"] > 0.5 * run["wall_seconds"], run
        assert run["disturbed"] and run["attempts"] == 1 + DISTURBED_RETRIES, run
        assert any(problem.startswith("other processes used") and "python3" in problem
                   for problem in run["problems"]), run
    assert "Invalid runs (left out of the medians):" in done.stdout


# --- the arithmetic of the report, on made-up runs ---------------------------------------


def made_up_run(stack, run, requests_per_s, valid=True):
    return RunRecord("keepalive", stack, run, valid=valid, problems=[] if valid else ["socket errors: read 3"],
                     requests=int(requests_per_s), seconds=1.0, requests_per_s=requests_per_s,
                     server_cpu_per_unit=1e6 / requests_per_s)


def test_ratio_is_taken_pair_by_pair_and_invalid_runs_stay_out_of_the_medians():
    keepalive = workloads.select(["keepalive"])
    runs = [made_up_run("kernel", 1, 100_000), made_up_run("shim", 1, 10_000),
            made_up_run("kernel", 2, 50_000), made_up_run("shim", 2, 10_000),
            made_up_run("kernel", 3, 90_000), made_up_run("shim", 3, 99_000, valid=False)]

    (summary,) = report.summarize(runs, keepalive)

    assert summary.stacks["kernel"].metrics["throughput"] == report.Spread(90_000, 50_000, 100_000)
    assert summary.stacks["shim"].metrics["throughput"] == report.Spread(10_000, 10_000, 10_000)
    assert summary.stacks["shim"].valid_runs == 2
    ratio = summary.ratios["throughput"]
    assert (ratio.median, ratio.low, ratio.high) == (pytest.approx(0.15), pytest.approx(0.1), pytest.approx(0.2))
    table = report.markdown_table([summary], runs, Settings(keepalive, duration=1, runs=3, connections=64))
    assert "- keepalive, shim, run 3: 99.0k req/s; socket errors: read 3" in table


def test_wrk_summary_with_errors_marks_the_run_invalid():
    output = ("Running 2s test\n" + workloads.WRK_MARK +
              '{"requests": 2000, "bytes": 460000, "duration_us": 2000000, "connect": 0, "read": 2, "write": 0, '
              '"timeout": 1, "non_2xx_3xx": 5, "p50_us": 61.0, "p99_us": 140.5}\n')

    result = workloads.parse_wrk(output)

    assert (result.requests, result.seconds, result.p50_us, result.p99_us) == (2000, 2.0, 61.0, 140.5)
    assert result.problems == ["socket errors: read 2, timeout 1", "non-2xx/3xx responses: 5"]


def test_iperf3_error_report_is_no_measurement():
    with pytest.raises(workloads.ClientOutputError, match="Connection refused"):
        workloads.parse_iperf3('{"start": {}, "intervals": [], "end": {}, '
                               '"error": "unable to connect to server: Connection refused"}')
