"""Pure statistics: p-values (`pvalues`), multiple testing (`testing`), threshold calibration
(`calibrate`), risk control for online monitors (`risk_control`), drift (`drift`), the cascade rule and
policies (`cascade`), delegation signals (`signals`) and metrics (`metrics`).

Nothing in this package imports Ray or torch, or does I/O; everything is a vectorised numpy/scipy
function of arrays, tested against closed-form oracles and by simulating the guarantee.
"""
