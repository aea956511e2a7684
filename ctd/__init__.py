"""ctd: Calibrate-Then-Delegate safety monitoring with a delegation-budget guarantee."""

__version__ = "0.1.0"
