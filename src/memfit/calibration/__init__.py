"""Calibrated methods: statistics from real text, gathered decoder layer by decoder layer.

`layerwise.calibrate_layers` runs the calibration windows through the model one decoder layer at
a time, lets a method observe each layer's inputs and change the layer, then feeds the changed
layer's outputs to the next one. `gptq` holds the GPTQ rounding.
"""

from memfit.calibration.layerwise import calibrate_layers, calibration_windows

__all__ = ["calibrate_layers", "calibration_windows"]
