"""The benchmark's measurement rules: interleaved rounds, ratios within a round, loaded rounds set apart."""

import torch

from classlens.bench.measure import (
    LOADED_SHARE,
    Round,
    busy_cpu_seconds,
    calls_per_reading,
    measure_rounds,
    summarise,
)

CPU = torch.device("cpu")


def reading(threads, forward, explain, share=0.0, wall_scale=1.0):
    times = {"forward": forward, "explain": explain}
    return Round(
        threads=threads,
        order=("forward", "explain"),
        cpu_s=times,
        wall_s={name: value * wall_scale for name, value in times.items()},
        load_average=0.5,
        others_share=share,
    )


def test_ratios_are_taken_within_a_round_and_spread_over_rounds():
    readings = [reading(1, 1.0, 1.2), reading(1, 2.0, 2.6), reading(1, 1.0, 1.4, share=LOADED_SHARE + 0.1)]
    figures = summarise(readings, "forward", CPU)["explain"]["1"]
    # 1.2, 1.3 and 1.4: a slow round (2 s forward) does not move the ratio of its own round.
    assert figures["ratio"] == {"min": 1.2, "median": 1.3, "max": 1.4}
    assert figures["quiet_ratio"] == {"min": 1.2, "median": 1.25, "max": 1.3}
    assert figures["loaded_rounds"] == 1
    assert figures["rounds"] == 3
    assert figures["cpu_ms"] == 1400.0


def test_every_round_loaded_leaves_no_quiet_figure():
    readings = [reading(2, 1.0, 1.5, share=0.9)]
    assert summarise(readings, "forward", CPU)["explain"]["2"]["quiet_ratio"] is None


def test_cuda_ratios_are_of_wall_time():
    # On a GPU the process's CPU time is not the work: the wall ratio is the figure.
    readings = [reading(1, 1.0, 1.0, wall_scale=1.0)]
    readings[0].wall_s["explain"] = 3.0
    assert summarise(readings, "forward", torch.device("cuda"))["explain"]["1"]["ratio"]["median"] == 3.0


def test_rounds_alternate_thread_counts_and_rotate_the_order():
    seen = []

    def method(name):
        return lambda: seen.append((name, torch.get_num_threads()))

    methods = {count: {name: method(name) for name in ("a", "b", "c")} for count in (1, 2)}
    before = torch.get_num_threads()
    readings = measure_rounds(methods, rounds=3, device=CPU, repeats={"c": 1}, warmup=0)
    assert torch.get_num_threads() == before
    assert [r.threads for r in readings] == [1, 2, 1, 2, 1, 2]
    assert [r.order for r in readings[::2]] == [("a", "b", "c"), ("b", "a"), ("a", "b")]
    # Each call ran at its round's thread count.
    assert all(threads == (1 if index // 3 % 2 == 0 else 2) for index, (_, threads) in enumerate(seen[:6]))
    assert all(r.cpu_s.keys() == set(r.order) for r in readings)


def test_the_machine_busy_counter_moves_when_this_process_works():
    before = busy_cpu_seconds()
    total = 0
    for value in range(3_000_000):
        total += value
    assert busy_cpu_seconds() > before


def test_a_reading_is_the_mean_of_its_calls_and_fast_methods_get_more_calls():
    counts = {"a": 0, "b": 0}

    def method(name):
        def run():
            counts[name] += 1

        return run

    readings = measure_rounds({1: {"a": method("a"), "b": method("b")}}, rounds=2, device=CPU, warmup=0, calls=5)
    assert counts == {"a": 10, "b": 10}
    assert all(r.calls == 5 for r in readings)
    assert calls_per_reading(lambda: None, CPU, threads=1) == 1000  # a free call: the cap
    assert calls_per_reading(lambda: sum(range(2_000_000)), CPU, threads=1, at_least_s=0.01) == 1
