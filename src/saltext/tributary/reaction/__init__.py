"""Reacting to the data (top master): rules raise alerts; Salt's reactor acts on them.

Like ``analysis``, nothing here imports the relay: the engine feeds it confirmed readings,
anomalies and health findings.
"""
