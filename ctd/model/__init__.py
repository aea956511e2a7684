"""The monitored model's side: activations, the linear probes, artifacts, the deployment (model +
probes + calibration checked together) and the training job."""
