"""Data, not code: YAML presets and Gadgetron XML chains. This file only makes the folder
installable as package data so presets are found wherever the package is installed."""
