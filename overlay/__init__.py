"""The overlay: identities, the Noise transport, multiplexed RPC and the Kademlia DHT.

Importing this package loads nothing heavy (no torch, no asyncio runtime): submodules are
imported where they are used, so the simulator can use the pure cores alone.
"""

__all__ = ["__version__"]
__version__ = "0.1.0"
