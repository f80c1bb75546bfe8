"""Data, not code: YAML presets and Gadgetron XML chains. Installed as ``gadget.pipelines`` (pyproject.toml's
package-dir); this file only makes the folder a package so presets are found wherever it is installed."""
