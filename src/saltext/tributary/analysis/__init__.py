"""Making sense of the readings where they land (top master): anomaly detection per series.

Nothing here imports the relay or the gateway: the relay engine offers confirmed readings to
whoever subscribes, and wires this package to it.
"""
