"""Training jobs from the client's side: build and submit a job, find it again (``jobs``), export
a checkpoint (``export``), plot its loss (``plot``)."""
