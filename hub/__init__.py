"""The issc hub: one asyncio process serving volunteer nodes."""
