"""Communication/computation models, calibration, prediction, plots and capacity planning.

This package reads tables and logs only: it must never import torch or tensorflow.
"""
