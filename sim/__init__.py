"""The discrete-event simulator: the overlay's own sans-IO cores on thousands of virtual peers.

Modules: engine (event heap, virtual clock, one random source), network (latency, bandwidth,
loss), churn, distributions, oracle (ground truth), dht_net (the DHT driver), dht_scenario,
swarm_* (servers, sessions, scenario), metrics, plots, scenarios, cli (`overlay-sim`).

Nothing here imports torch or asyncio, and this package imports nothing eagerly.
"""
