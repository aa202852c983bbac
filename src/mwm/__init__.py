"""MWM — Mask What Matters: text-guided masked image modeling for medical imaging."""

__version__ = "0.1.0"
