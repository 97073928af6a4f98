"""The discrete-event simulator. Never imports torch or asyncio."""
