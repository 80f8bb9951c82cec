"""CARLA support: the client import, port leasing, the server manager and an in-process stand-in,
and the simulator failures the collector handles (errors.py).

Nothing here imports ``carla`` at module import time, so every module loads without the
``[carla]`` extra; :func:`actors.carla.client.import_carla` is the one place that imports it.
"""
