"""Energy of a session: measured where the machine allows, estimated (and labelled so) where not.

- CPU: RAPL package (and DRAM) counters in /sys/class/powercap/intel-rapl:*/energy_uj (Intel, and
  AMD on Linux 5.8+). They count the whole package, other processes included, and wrap at
  max_energy_range_uj (a few minutes at full power), so a thread samples them every few seconds.
  Since 2020 most kernels let only root read them: then the reason is recorded.
- GPU: NVML's total-energy counter (nvmlDeviceGetTotalEnergyConsumption, millijoules, Volta and
  newer) through pynvml when it is installed.
- Otherwise an estimate: CPU time used by this process x watts per busy core, and GPU time x the
  board power (TDP) from the device table: an upper bound, the assumption Meta's Llama 2
  accounting made.
"""

from __future__ import annotations

import glob
import os
import threading
import time
from dataclasses import dataclass

RAPL_ROOT = "/sys/class/powercap"


@dataclass
class _Zone:
    name: str
    path: str
    max_uj: int
    last: int
    total_uj: int = 0


class Rapl:
    """Package and DRAM energy counters under a powercap root (SLM_RAPL_ROOT overrides the default,
    for machines that mount it elsewhere). `error` says why nothing can be read."""

    def __init__(self, root: str | None = None):
        self.root = root or os.environ.get("SLM_RAPL_ROOT") or RAPL_ROOT
        self.zones: list[_Zone] = []
        self.error: str | None = None
        denied, seen = [], set()
        # Zones appear at the top level (intel-rapl:0, and sub-zones as intel-rapl:0:0) and nested
        # under their package. Packages and DRAM are disjoint; core/uncore are inside the package
        # and psys (the whole platform) contains it, so those would count twice.
        paths = glob.glob(os.path.join(self.root, "intel-rapl:*")) + \
            glob.glob(os.path.join(self.root, "intel-rapl:*", "intel-rapl:*"))
        for path in sorted(paths):
            real = os.path.realpath(path)
            name = _read(os.path.join(path, "name")) or ""
            if real in seen or not (name.startswith("package") or name == "dram"):
                continue
            seen.add(real)
            try:
                first = int(_read_strict(os.path.join(path, "energy_uj")))
                max_uj = int(_read(os.path.join(path, "max_energy_range_uj")) or 2**32)
            except PermissionError:
                denied.append(path)
                continue
            except (OSError, ValueError):
                continue
            self.zones.append(_Zone(f"{os.path.basename(path)} ({name})", path, max_uj, first))
        if not self.zones:
            self.error = (f"RAPL counters in {self.root} are not readable (permission denied; root can "
                          f"`chmod a+r {self.root}/intel-rapl:*/energy_uj`)" if denied else
                          f"no RAPL package counters in {self.root}")

    def sample(self) -> None:
        """Add each counter's increase since the last sample, counting one wrap at max_energy_range_uj."""
        for z in self.zones:
            try:
                now = int(_read_strict(os.path.join(z.path, "energy_uj")))
            except (OSError, ValueError):
                continue
            z.total_uj += now - z.last if now >= z.last else z.max_uj - z.last + now
            z.last = now

    @property
    def joules(self) -> float:
        return sum(z.total_uj for z in self.zones) / 1e6


class Nvml:
    """GPU energy from NVML's total-energy counter, for the CUDA devices given (torch indices)."""

    def __init__(self, indices: list[int]):
        self.handles, self.start, self.error = [], [], None
        self.joules_now = 0.0
        try:
            import pynvml
        except ImportError:
            self.error = "pynvml is not installed (pip install nvidia-ml-py)"
            return
        try:
            pynvml.nvmlInit()
            for i in indices:
                h = _nvml_handle(pynvml, i)
                self.handles.append(h)
                self.start.append(pynvml.nvmlDeviceGetTotalEnergyConsumption(h))
            self.nvml = pynvml
        except Exception as e:  # NVMLError: no driver, or a GPU older than Volta
            self.handles, self.error = [], f"NVML total energy not available ({e})"

    def sample(self) -> None:
        if self.handles:  # a 64-bit millijoule counter: no wrap to handle
            now = [self.nvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self.handles]
            self.joules_now = sum(b - a for a, b in zip(self.start, now)) / 1e3


def _nvml_handle(pynvml, index: int):
    """NVML numbers GPUs differently from CUDA under CUDA_VISIBLE_DEVICES: match by UUID."""
    import torch
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    if uuid is not None:
        text = str(uuid)
        return pynvml.nvmlDeviceGetHandleByUUID(text if text.startswith("GPU-") else f"GPU-{text}")
    return pynvml.nvmlDeviceGetHandleByIndex(index)


@dataclass
class Energy:
    joules: float
    method: str  # measured | estimated | mixed
    how: str

    @property
    def kwh(self) -> float:
        return self.joules / 3.6e6


class EnergyMeter:
    """Samples RAPL and NVML every `interval` seconds on a thread (often enough not to miss a
    RAPL wrap) and falls back to the estimate for whatever it cannot read.

    cpu_watts_per_core: the estimate's power of a busy core; gpu_watts: the board power of each
    GPU in `gpus` (CUDA indices); processes: how many processes like this one share the work (the
    estimate counts this process's CPU time that many times)."""

    def __init__(self, cpu_watts_per_core: float, gpus: list[int] = (), gpu_watts: float = 0.0,
                 rapl_root: str | None = None, interval: float = 5.0, processes: int = 1):
        self.cpu_watts, self.gpus, self.gpu_watts = cpu_watts_per_core, list(gpus), gpu_watts
        self.processes, self.interval = processes, interval
        self.rapl = Rapl(rapl_root)
        self.nvml = Nvml(self.gpus) if self.gpus else None
        self._cpu0 = _cpu_seconds()
        self._t0 = time.perf_counter()
        self._stop = threading.Event()
        self._lock = threading.Lock()  # the sampling thread and read() (a server's /metrics) take turns
        self._thread = None
        if self.rapl.zones or (self.nvml and self.nvml.handles):
            self._thread = threading.Thread(target=self._run, name="slm-energy", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        with self._lock:
            self.rapl.sample()
            if self.nvml:
                self.nvml.sample()

    def stop(self) -> Energy:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return self.read()

    def read(self) -> Energy:
        """The energy so far (the meter keeps running)."""
        self.sample()
        seconds = time.perf_counter() - self._t0
        cpu_s = (_cpu_seconds() - self._cpu0) * self.processes
        parts, measured, estimated = [], 0.0, 0.0
        how = set()  # by the path taken, not by value: a short session may estimate 0 J
        if self.rapl.zones:
            how.add("measured")
            measured += self.rapl.joules
            parts.append(f"measured: RAPL {', '.join(z.name for z in self.rapl.zones)} "
                         f"(whole CPU package, other processes included)")
        else:
            how.add("estimated")
            estimated += cpu_s * self.cpu_watts
            parts.append(f"estimated: {cpu_s:.1f} CPU core-seconds of this process x {self.cpu_watts:g} W per "
                         f"busy core (SLM_CPU_WATTS_PER_CORE), because {self.rapl.error}")
        if self.gpus:
            if self.nvml and self.nvml.handles:
                how.add("measured")
                measured += self.nvml.joules_now
                parts.append(f"measured: NVML total energy of GPU {', '.join(map(str, self.gpus))}")
            else:
                how.add("estimated")
                estimated += seconds * len(self.gpus) * self.gpu_watts
                why = self.nvml.error if self.nvml else "no NVML"
                parts.append(f"estimated: {len(self.gpus)} GPU x {seconds:.1f} s x {self.gpu_watts:g} W board power "
                             f"(TDP, an upper bound), because {why}")
        method = "mixed" if len(how) == 2 else how.pop()
        return Energy(measured + estimated, method, "; ".join(parts))


def _cpu_seconds() -> float:
    """CPU seconds of this process (time.process_time: nanoseconds, where os.times counts 10 ms
    ticks, and a 12-token generate on the decoder takes ~7 ms) and of its waited-for children."""
    t = os.times()
    return time.process_time() + t.children_user + t.children_system


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _read_strict(path: str) -> str:
    with open(path) as f:
        return f.read().strip()
