"""Training: the Ray Train worker loop, its plain-PyTorch steps, and the driver."""
