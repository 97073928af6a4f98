"""`overlay-sim` end to end: outputs, reproducibility, options, imports."""

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from sim.cli import main
from sim.scenarios import ConfigError, set_option
from sim.swarm_config import SwarmScenarioConfig

ROOT = Path(__file__).resolve().parents[2]


def _cli(args: list[str], hash_seed: str = "0", timeout: float = 120.0):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED=hash_seed)
    return subprocess.run([sys.executable, "-m", "sim.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_importing_the_simulator_loads_neither_torch_nor_asyncio():
    code = ("import sys, sim, sim.cli, sim.scenarios, sim.dht_scenario, sim.swarm_scenario; "
            "bad = [m for m in ('torch', 'asyncio') if m in sys.modules]; "
            "assert not bad, bad")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_list_names_every_scenario(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("dht-static", "dht-churn", "swarm"))


@pytest.mark.parametrize("args", [
    ["dht-churn", "--nodes", "40", "--duration", "120", "--set", "churn.scale=60",
     "--set", "churn.down_scale=30", "--set", "ops_per_s=4"],
    ["swarm", "--servers", "10", "--duration", "600", "--churn", "weibull",
     "--set", "churn.scale=600", "--set", "churn.down_scale=120",
     "--set", "session_rate=0.03", "--set", "max_tokens=512"],
])
def test_same_seed_gives_byte_identical_results(tmp_path, args):
    """Two processes with different string-hash seeds, same simulation seed."""
    outs = []
    for hash_seed in ("1", "2"):
        out = tmp_path / hash_seed
        done = _cli(["run", *args, "--seed", "7", "--out", str(out), "--no-plots", "--quiet"],
                    hash_seed=hash_seed)
        assert done.returncode == 0, done.stderr
        outs.append(out)
    a, b = ((o / "metrics.json").read_bytes() for o in outs)
    assert a == b  # no flag needed: timings live in timing.json
    assert (outs[0] / "timeseries.csv").read_bytes() == (outs[1] / "timeseries.csv").read_bytes()
    metrics = json.loads(a)
    assert metrics["events"] > 1000 and "wall_s" not in metrics
    timings = [json.loads((o / "timing.json").read_text()) for o in outs]
    assert all(t["wall_s"] > 0 and t["cpu_s"] > 0 and t["events"] == metrics["events"]
               for t in timings)
    churn_moved = metrics.get("departures", metrics.get("server_departures"))
    assert churn_moved > 0  # the runs did exercise churn
    if args[0] != "swarm":
        return
    # A different seed gives a different run.
    other = tmp_path / "other"
    assert _cli(["run", *args, "--seed", "8", "--out", str(other), "--no-timing",
                 "--no-plots", "--quiet"]).returncode == 0
    assert not (other / "timing.json").exists()
    assert (other / "metrics.json").read_bytes() != a


def test_run_writes_metrics_series_config_and_plots(tmp_path):
    out = tmp_path / "run"
    done = _cli(["run", "dht-static", "--nodes", "60", "--duration", "120", "--out", str(out)])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out)
    assert "dht-static" in done.stderr and "100%" in done.stderr  # the progress report
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("lookup_success_rate", "hops_p50", "lookup_latency_p50_s", "events"):
        assert key in metrics
    assert metrics["nodes"] == 60
    timing = json.loads((out / "timing.json").read_text())
    assert timing["wall_s"] > 0 and timing["events_per_s"] > 0
    assert "wall_s" in done.stderr  # the summary on standard error
    rows = list(csv.reader((out / "timeseries.csv").open()))
    assert rows[0][0] == "time_s" and len(rows) == 1 + 2
    config = json.loads((out / "config.json").read_text())
    assert config["nodes"] == 60 and config["churn.kind"] == "none"
    for png in ("timeseries.png", "distributions.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_runs_each_value_and_plots_them_together(tmp_path):
    out = tmp_path / "sweep"
    done = _cli(["sweep", "swarm", "--param", "servers", "--values", "6,12",
                 "--duration", "300", "--set", "session_rate=0", "--out", str(out),
                 "--quiet"])
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert [r["servers"] for r in rows] == ["6", "12"]
    bottleneck = [float(r["bottleneck_throughput_mean"]) for r in rows]
    assert bottleneck[1] > bottleneck[0]
    assert (out / "sweep.png").exists() and (out / "servers=12" / "metrics.json").exists()


def test_a_swept_option_that_is_also_a_metric_is_one_column(tmp_path):
    """`nodes` (and `servers`, `churn`) are metrics too: sweep.csv had two `nodes` columns."""
    out = tmp_path / "sweep"
    assert main(["sweep", "dht-static", "--param", "nodes", "--values", "20,30", "--duration",
                 "5", "--quiet", "--no-plots", "--out", str(out)]) == 0
    header, *rows = list(csv.reader((out / "sweep.csv").open()))
    assert header.count("nodes") == 1 and header[0] == "nodes"
    assert [row[0] for row in rows] == ["20", "30"]
    assert all(len(row) == len(header) for row in rows)


def test_bad_options_get_a_clear_error(capsys):
    assert main(["run", "swarm", "--nodes", "10"]) == 2
    assert "use --servers" in capsys.readouterr().err
    assert main(["run", "dht-static", "--set", "dht.kay=3"]) == 2
    assert "unknown option 'dht.kay'; known in dht: alpha" in capsys.readouterr().err
    assert main(["run", "dht-static", "--set", "network.loss.x=1"]) == 2
    assert "'network.loss' is a value, not a section" in capsys.readouterr().err
    assert main(["run", "dht-static", "--set", "nodes=many"]) == 2
    assert "expected an integer" in capsys.readouterr().err
    assert main(["run", "swarm", "--set", "recovery=pray"]) == 2
    assert "recovery must be replay or restart" in capsys.readouterr().err
    assert main(["run", "dht-static", "--duration", "-5"]) == 2
    assert "duration and sample_interval must be positive" in capsys.readouterr().err
    # every value of a sweep is checked before the first run starts
    assert main(["sweep", "dht-static", "--param", "nodes", "--values", "50,1"]) == 2
    assert "at least 2 nodes" in capsys.readouterr().err


def test_an_unwritable_out_directory_is_one_clear_line(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    args = ["run", "dht-static", "--nodes", "20", "--duration", "5", "--quiet"]
    assert main([*args, "--out", str(blocker / "results")]) == 1
    assert "overlay-sim: cannot write the results:" in capsys.readouterr().err


@pytest.mark.parametrize("values,message", [
    ("20,../up", "'../up' cannot name a run's folder"),
    ("20,a/b", "'a/b' cannot name a run's folder"),
    ("with space", "'with space' cannot name a run's folder"),
    ("20,20", "'20' is listed twice"),
])
def test_sweep_values_that_cannot_name_a_folder_are_refused(tmp_path, capsys, values, message):
    """Each value names its run's folder, OUT/KEY=VALUE: '/' used to make nested folders
    (one run's inside another's), a repeated value overwrote its first run."""
    out = tmp_path / "sweep"
    assert main(["sweep", "swarm", "--param", "model.name", "--values", values, "--quiet",
                 "--no-plots", "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"overlay-sim: --values: {message}" + (
        " (one folder per value)\n" if "twice" in message
        else "; use letters, digits and . _ + - only\n")
    assert not out.exists()


@pytest.mark.parametrize(("values", "message"), [
    ("50,50.5", "nodes=50.5: expected an integer, got '50.5'"),
    ("50,1000000000", "nodes=1000000000: nodes must be at most 100,000"),
])
def test_a_sweep_value_refused_while_parsed_leaves_no_out_folder(tmp_path, capsys, values,
                                                                  message):
    out = tmp_path / "sweep"
    assert main(["sweep", "dht-static", "--param", "nodes", "--values", values, "--quiet",
                 "--no-plots", "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith(f"overlay-sim: {message}")
    assert not out.exists()  # it used to be made (empty) before the values were checked


def test_the_largest_documented_sizes_are_accepted():
    from sim.dht_scenario import dht_churn_config, dht_static_config

    dht_static_config(nodes=100_000, duration=10.0)  # bench_sim's memory run
    dht_churn_config(nodes=10_000, duration=3600.0)
    SwarmScenarioConfig(servers=300, duration=3600.0, session_rate=0.2)


def test_ctrl_c_stops_a_sweep_and_keeps_the_finished_runs(tmp_path):
    """SIGINT in the third run of a sweep: exit 130 with one line, sweep.csv holds the two
    runs that finished, the interrupted run leaves no directory."""
    out = tmp_path / "sweep"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sim.cli", "sweep", "dht-static", "--param", "nodes",
         "--values", "20,30,2000", "--duration", "5", "--no-plots", "--out", str(out)],
        cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # the progress lines: wait until the third run has begun
            if "(3/3)" in line:
                break
        proc.send_signal(signal.SIGINT)
        err = proc.stderr.read()
        assert proc.wait(timeout=60) == 130, err
    finally:
        proc.kill()
    assert "Traceback" not in err
    assert "nodes=2000 (3/3) interrupted" in err and "holds the 2 finished runs" in err
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert [r["nodes"] for r in rows] == ["20", "30"]
    assert not (out / "nodes=2000").exists()


def test_ctrl_c_while_starting_is_one_line_and_exit_130():
    """Ctrl-C raised while the console script imports sim.cli (as the signal would raise it
    there): it used to print the import stack instead."""
    code = ("import sys\n"
            "class Interrupt:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'sim.scenarios':\n"
            "            raise KeyboardInterrupt\n"
            "sys.meta_path.insert(0, Interrupt())\n"
            "from sim.cli import main\n"
            "sys.exit(main(['list']))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert (done.returncode, done.stderr) == (130, "overlay-sim: interrupted\n")


def test_set_option_reaches_nested_fields():
    config = set_option(SwarmScenarioConfig(), "network.latency", "lognormal")
    config = set_option(config, "churn.mass_at", "100")
    config = set_option(config, "model.num_blocks", "48")
    assert (config.network.latency, config.churn.mass_at, config.model.num_blocks) == (
        "lognormal", 100, 48)
    with pytest.raises(ConfigError, match="is a section"):
        set_option(config, "network", "fast")
    # The A100 class holds 40 blocks: on a 24-block model it serves all of them (refused
    # before, so the docs' own `--set model.num_blocks=32` did not run).
    small = set_option(config, "model.num_blocks", "24")
    assert [c.num_blocks for c in small.classes] == [24, 12, 8]
    assert [c.num_blocks for c in config.classes] == [40, 12, 8]


def test_a_model_smaller_than_a_server_class_runs(tmp_path):
    out = tmp_path / "small"
    assert main(["run", "swarm", "--servers", "6", "--duration", "300", "--set",
                 "model.num_blocks=8", "--quiet", "--no-plots", "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["blocks"] == 8 and m["coverage_min_final"] == 6  # every server holds the model
    assert m["sessions_completed"] > 0 and m["bottleneck_ratio_to_optimal"] == 1.0


def test_none_is_a_value_of_string_options_and_clears_only_optional_ones(tmp_path):
    """`--churn none` (the docs' first churn model) was parsed as None and refused."""
    config = set_option(SwarmScenarioConfig(), "churn.kind", "none")
    config = set_option(config, "model.compression", "none")
    assert (config.churn.kind, config.model.compression) == ("none", "none")
    config = set_option(set_option(config, "churn.mass_at", "100"), "churn.mass_at", "None")
    assert config.churn.mass_at is None
    with pytest.raises(ConfigError, match="expected a number"):
        set_option(config, "warmup", "none")  # not optional: a run would crash on it
    with pytest.raises(ConfigError, match=r"churn\.mass_at=soon: expected a number or none"):
        set_option(config, "churn.mass_at", "soon")  # was "must be real number, not str"
    assert main(["run", "dht-churn", "--nodes", "20", "--duration", "5", "--churn", "none",
                 "--quiet", "--no-plots", "--out", str(tmp_path / "run")]) == 0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["churn"] == "none"


@pytest.mark.parametrize("scenario,option,message", [
    # each of these was a traceback halfway through the run, a run that never ended, or a
    # run of NaN event times that silently measured nothing
    ("dht-churn", "churn.shape=0", "shape must be a finite number > 0"),
    ("dht-churn", "churn.scale=nan", "scale must be a finite number > 0"),
    ("dht-churn", "churn.shape=1e-4", "no finite mean"),
    ("dht-churn", "churn.mass_at=-10", "mass_at must be a finite number >= 0"),
    ("dht-churn", "churn.kind=mass --set churn.mass_at=600", "would never happen"),
    ("dht-static", "network.one_way_median=0", "one_way_median must be"),
    ("dht-static", "network.one_way_min=nan", "one_way_min must be"),
    ("dht-static", "record_ttl=0", "record_ttl must be a finite number > 0"),
    ("dht-static", "record_ttl=1e6", "is over dht.limits.max_ttl=86400"),
    ("dht-static", "value_bytes=65534", "over dht.limits.max_value_bytes=65536"),
    ("dht-static", "duration=inf", "duration must be a finite number > 0"),
    ("dht-static", "driver.silent_fraction=2", "silent_fraction must be in [0, 1]"),
    ("dht-churn", "dht.bucket_refresh_interval=0", "bucket_refresh_interval must be"),
    ("dht-churn", "dht.request_timeout=nan", "request_timeout must be"),
    ("swarm", "duration=inf", "duration must be a finite number > 0"),
    ("swarm", "model.hidden_size=0", "hidden_size must be at least 1"),
    ("swarm", "model.dtype=int3", "unsupported dtype 'int3'"),
    ("swarm", "model.compression=zzz", "unknown compression 'zzz'"),
    ("swarm", "balance_check_period=0", "balance_check_period must be"),
    ("swarm", "step_timeout=-1", "step_timeout must be"),
    ("swarm", "graceful_fraction=2", "graceful_fraction must be in [0, 1]"),
    ("swarm", "balance_quality=nan", "balance_quality must be"),
    # loads that used to fill the memory before the first event (never refused)
    ("dht-static", "nodes=100001", "nodes must be at most 100,000, got 100,001"),
    ("dht-static", "ops_per_s=1e6", "operations (ops_per_s x duration) must be at most"),
    ("dht-static", "sample_interval=1e-6", "samples (duration / sample_interval) must be"),
    ("dht-static", "ops_per_s=10000 --set value_bytes=65000", "bytes stored (ops_per_s x"),
    ("swarm", "servers=1000000", "servers must be at most 3,000"),
    ("swarm", "model.num_blocks=100000000", "model blocks must be at most 10,000"),
    ("swarm", "session_rate=1e5", "sessions (session_rate x duration) must be at most 100,000"),
    ("swarm", "sample_interval=1e-6", "samples (duration / sample_interval) must be"),
])
def test_values_a_run_cannot_use_are_refused_before_it_starts(capsys, scenario, option,
                                                               message):
    assert main(["run", scenario, "--duration", "60", *f"--set {option}".split(), "--quiet",
                 "--no-plots",
                 "--out", "/nonexistent/never-written"]) == 2
    err = capsys.readouterr().err
    last = option.split()[-1]
    assert err.startswith(f"overlay-sim: {last}: ")  # the whole dotted path, as given
    assert message in err and "Traceback" not in err


def test_a_misspelt_sweep_metric_is_named_after_the_first_run(tmp_path, capsys):
    """It only drew an empty panel, silently, once the whole sweep had run."""
    assert main(["sweep", "dht-static", "--param", "nodes", "--values", "20,30",
                 "--duration", "5", "--metrics", "lookup_sucess_rate,hops_p50", "--quiet",
                 "--no-plots", "--out", str(tmp_path / "sweep")]) == 0
    err = capsys.readouterr().err
    assert err.count("dht-static has no metric 'lookup_sucess_rate'") == 1
    assert "hops_p50" not in err
    # empty names (a stray comma) are no metrics to warn about: "no metric '', ''"
    assert main(["sweep", "dht-static", "--param", "nodes", "--values", "20", "--duration",
                 "5", "--metrics", "hops_p50,", "--quiet", "--no-plots", "--out",
                 str(tmp_path / "again")]) == 0
    assert capsys.readouterr().err == ""


def test_a_rerun_into_the_same_out_leaves_nothing_of_the_last_one(tmp_path):
    """The plots and timing.json of an earlier run stayed next to the new metrics.json."""
    run = ["run", "dht-static", "--nodes", "20", "--duration", "5", "--quiet"]
    assert main([*run, "--out", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "timeseries.png").exists()
    assert main([*run, "--no-plots", "--no-timing", "--out", str(tmp_path / "run")]) == 0
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "config.json", "metrics.json", "timeseries.csv"]
    sweep = ["sweep", "dht-static", "--param", "nodes", "--values", "20", "--duration", "5",
             "--quiet", "--out", str(tmp_path / "sweep")]
    assert main(sweep) == 0 and (tmp_path / "sweep" / "sweep.png").exists()
    assert main([*sweep, "--no-plots"]) == 0
    assert not (tmp_path / "sweep" / "sweep.png").exists()


@pytest.mark.parametrize("args,counts", [
    (["dht-static", "--nodes", "30", "--duration", "90"],
     {"finds": "lookups", "gets": "gets", "requests": "requests", "bytes": "bytes"}),
    (["swarm", "--servers", "6", "--duration", "100", "--set", "model.num_blocks=8",
      "--set", "session_rate=0.1"], {}),
])
def test_the_time_series_covers_a_duration_that_is_not_a_whole_number_of_intervals(
        tmp_path, args, counts):
    """The last, shorter interval had no row: its lookups, requests, tokens were missing."""
    out = tmp_path / "run"
    assert main(["run", *args, "--quiet", "--no-plots", "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    rows = list(csv.DictReader((out / "timeseries.csv").open()))
    assert float(rows[-1]["time_s"]) == m["duration_s"]
    for column, metric in counts.items():
        assert sum(int(r[column]) for r in rows) == m[metric]
    if args[0] == "swarm":
        times = [float(r["time_s"]) for r in rows]
        tokens = sum(float(r["tokens_per_s"]) * (b - a)
                     for r, a, b in zip(rows[1:], times, times[1:]))
        assert m["tokens_computed"] > 0 and tokens == pytest.approx(m["tokens_computed"])


def test_the_progress_log_ends_at_100_percent(tmp_path, capsys):
    """The engine reports every 8192 events, so a run ending mid-chunk stopped at 90%."""
    assert main(["run", "dht-static", "--nodes", "50", "--duration", "30", "--no-plots",
                 "--out", str(tmp_path / "run")]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "% t=" in line]
    assert lines[-1].startswith("dht-static: 100% t=62/62s")
    assert sum("100%" in line for line in lines) == 1


def test_ctrl_c_while_results_are_written_keeps_all_of_a_run_or_none(tmp_path, monkeypatch,
                                                                     capsys):
    """Ctrl-C while a finished run drew its plots left a folder with half its files, and in a
    sweep it skipped sweep.csv of the runs before."""
    import sim.plots
    from sim.cli import main

    real, calls = sim.plots.plot_run, []

    def plot_then_ctrl_c(result, out):
        calls.append(out)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(result, out)

    monkeypatch.setattr(sim.plots, "plot_run", plot_then_ctrl_c)
    out = tmp_path / "sweep"
    code = main(["sweep", "dht-static", "--nodes", "20", "--duration", "5", "--param", "seed",
                 "--values", "1,2,3", "--quiet", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 130, err
    assert "seed=2 (2/3) interrupted while its results were written" in err
    assert "holds the 1 finished runs" in err
    assert [r["seed"] for r in csv.DictReader((out / "sweep.csv").open())] == ["1"]
    assert (out / "sweep.png").exists() and (out / "seed=1" / "timeseries.png").exists()
    assert not (out / "seed=2").exists() and not (out / "seed=3").exists()
    calls.clear()
    calls.append(None)  # the next plot is the second: Ctrl-C
    single = tmp_path / "run"
    assert main(["run", "dht-static", "--nodes", "20", "--duration", "5", "--quiet",
                 "--out", str(single)]) == 130
    assert not single.exists()
