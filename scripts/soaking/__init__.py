"""The parts of scripts/soak.py, one job each."""
