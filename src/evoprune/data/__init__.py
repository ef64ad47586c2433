"""Text sources and calibration sampling."""
