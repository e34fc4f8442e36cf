"""Footprint: FLOPs, energy, CO2 and money of every run (receipts), and forecasts of runs to come.

    flops.py     FLOPs per token (6N + attention to train, 2N + attention to infer)
    devices.py   peak FLOP/s, power and price of GPUs; this CPU's measured peak
    energy.py    RAPL and NVML energy counters, or a labelled estimate
    receipt.py   track(): a receipt for a session, printed and written as JSON
    forecast.py  forecast(): 6ND -> GPU-hours, days, kWh, tCO2, dollars; checked against published runs
"""

from .forecast import DEFAULT_MFU, forecast, validation
from .receipt import Tracker, load_receipts, track

__all__ = ["DEFAULT_MFU", "Tracker", "forecast", "load_receipts", "track", "validation"]
