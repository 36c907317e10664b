"""`capsule doctor`: probe the machine (probes.py, bench.py), judge it with pure rules
(diagnose.py), print text or JSON with an exit code (report.py). torch is imported only
inside the probing functions."""
from .facts import Bench, Device, Facts, Smoke

__all__ = ["Bench", "Device", "Facts", "Smoke"]
