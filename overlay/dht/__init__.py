"""The Kademlia DHT: a sans-IO core (ids, routing table, lookups, records, messages, node)
and, in `driver`, the asyncio runtime that runs it on a Host.

Nothing is imported eagerly: the simulator imports the pure modules it needs, and
`import overlay.dht` stays cheap.
"""
