"""The scenarios the simulator ships, and how a configuration is built from the command line.

Every scenario is a frozen config dataclass plus a class whose `run(progress)` returns a
`RunResult`. Options are set on the config by dotted path (`churn.kind`, `network.latency`,
`dht.k`, `model.num_blocks`), with values parsed after the type of the default they replace.

Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sim.dht_scenario import DHTScenario, dht_churn_config, dht_static_config
from sim.engine import ProgressFn
from sim.metrics import RunResult
from sim.swarm_config import SwarmScenarioConfig
from sim.swarm_scenario import SwarmScenario


class ConfigError(ValueError):
    """An option that names no field, or a value that does not fit it."""


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    description: str
    default_config: Callable[[], Any]
    runner: Callable[[str, Any], Any]  # (name, config) -> object with run(progress)
    size_field: str  # what --nodes / --servers sets
    sweep_metrics: tuple[str, ...]

    def run(self, config: Any, progress: ProgressFn | None = None) -> tuple[Any, RunResult]:
        instance = self.runner(self.name, config)
        return instance, instance.run(progress)


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            "dht-static",
            "N nodes running the Kademlia core, no churn; lookups, stores and gets from "
            "random nodes judged against brute force",
            dht_static_config,
            DHTScenario,
            "nodes",
            ("hops_p50", "lookup_latency_p50_s", "lookup_success_rate"),
        ),
        Scenario(
            "dht-churn",
            "the same under churn (Weibull sessions by default, Stutzbach & Rejaie 2006); "
            "departed nodes rejoin through the real bootstrap",
            dht_churn_config,
            DHTScenario,
            "nodes",
            ("lookup_success_rate", "get_success_rate", "lookup_latency_p50_s"),
        ),
        Scenario(
            "swarm",
            "a Petals-like swarm: heterogeneous servers placing themselves with the real "
            "placement rule, clients running inference sessions with the real route choice "
            "and recovery",
            SwarmScenarioConfig,
            SwarmScenario,
            "servers",
            ("bottleneck_throughput_mean", "session_completion_rate", "tokens_per_s"),
        ),
    )
}


def parse_value(text: str, current: object, optional: bool = False) -> object:
    """`text` as the type of `current` (the default it replaces).

    "none" or "null" is None only for a field that may be None (`churn.mass_at`); a string
    field keeps it as a value (`churn.kind=none`, `model.compression=none`).
    """
    lowered = text.strip().lower()
    if lowered in ("none", "null") and (optional or current is None):
        return None
    if isinstance(current, str):
        return text
    if isinstance(current, bool):
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"expected a boolean, got {text!r}")
    if isinstance(current, int):
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"expected an integer, got {text!r}") from None
    if isinstance(current, float):
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"expected a number, got {text!r}") from None
    if current is None:  # an optional number (the only kind of optional field there is)
        for kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                pass
        raise ConfigError(f"expected a number or none, got {text!r}")
    raise ConfigError(f"cannot set a {type(current).__name__} from the command line")


def set_option(config: Any, path: str, text: str, _section: str = "") -> Any:
    """A copy of `config` with the field at dotted `path` set from `text`.

    Errors name the whole dotted path (`churn.shape=0`, `unknown option 'dht.kay'`).
    """
    head, _, rest = path.partition(".")
    where = f"{_section}{head}"
    if not dataclasses.is_dataclass(config):
        raise ConfigError(f"{_section.rstrip('.')!r} is a value, not a section: nothing in it "
                          f"to set")
    fields = {f.name: f for f in dataclasses.fields(config)}
    names = fields.keys()
    if head not in names:
        known = f"known in {_section[:-1]}" if _section else "known"
        raise ConfigError(f"unknown option {where!r}; {known}: {', '.join(sorted(names))}")
    current = getattr(config, head)
    if rest:
        value = set_option(current, rest, text, f"{where}.")
    else:
        if dataclasses.is_dataclass(current):
            raise ConfigError(f"{where!r} is a section; set one of its fields ({where}.NAME)")
        try:
            value = parse_value(text, current, optional="None" in str(fields[head].type))
        except ConfigError as e:
            raise ConfigError(f"{where}={text}: {e}") from None
    try:
        return dataclasses.replace(config, **{head: value})
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{_section}{path}={text}: {e}") from None


def describe(config: Any) -> dict[str, object]:
    """The configuration as flat dotted keys (written next to the results)."""
    out: dict[str, object] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            for key, inner in describe(value).items():
                out[f"{f.name}.{key}"] = inner
        elif isinstance(value, tuple):
            out[f.name] = repr(value)
        else:
            out[f.name] = value
    return out
