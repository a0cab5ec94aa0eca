"""What makes a bench run invalid besides its own failures: CPU taken by
processes outside the bench's tree, or by the hypervisor."""
from mtcpshim.bench import cpu
from mtcpshim.bench.runner import DISTURBED_RETRIES, RunRecord, disturbances, measure_undisturbed


def record(foreign=0.0, stolen=0.0, wall=10.0) -> RunRecord:
    return RunRecord("keepalive", "kernel", 1, valid=True, problems=[], wall_seconds=wall,
                     foreign_cpu_s=foreign, stolen_cpu_s=stolen)


def test_foreign_cpu_counts_only_processes_outside_ours_born_ones_from_zero():
    before = {10: ("wrk", 1.0), 20: ("updatedb", 5.0), 30: ("lighttpd", 2.0)}
    after = {10: ("wrk", 3.0), 20: ("updatedb", 6.5), 30: ("lighttpd", 4.0), 40: ("cron", 0.25)}
    assert cpu.foreign_seconds(before, after, ours={10, 30}) == {"updatedb": 1.5, "cron": 0.25}


def test_a_quiet_run_stays_valid():
    assert disturbances(record(foreign=0.2, stolen=0.1), {"sshd": 0.2}) == []


def test_another_process_using_a_tenth_of_a_cpu_invalidates_the_run_and_is_named():
    (problem,) = disturbances(record(foreign=1.0), {"updatedb": 0.9, "cron": 0.1})
    assert problem == "other processes used 10% of a CPU (updatedb 0.90 s, cron 0.10 s)"


def test_steal_by_the_hypervisor_invalidates_the_run():
    (problem,) = disturbances(record(stolen=2.0), {})
    assert problem == "the hypervisor took 20% of a CPU (steal)"


def test_a_disturbed_run_is_measured_again_until_it_is_quiet():
    outcomes = iter([True, False, True])

    def measure_once(*_):
        disturbed = next(outcomes)
        return RunRecord("keepalive", "kernel", 1, valid=not disturbed,
                         problems=["the hypervisor took 20% of a CPU (steal)"] if disturbed else [],
                         disturbed=disturbed)

    record = measure_undisturbed(None, None, 1, None, "", measure_once=measure_once)
    assert record.valid and record.attempts == 2


def test_a_run_disturbed_every_time_stays_invalid_after_the_last_retry():
    calls = []

    def measure_once(*_):
        calls.append(1)
        return RunRecord("keepalive", "kernel", 1, valid=False, problems=["steal"], disturbed=True)

    record = measure_undisturbed(None, None, 1, None, "", measure_once=measure_once)
    assert not record.valid and record.attempts == len(calls) == DISTURBED_RETRIES + 1
