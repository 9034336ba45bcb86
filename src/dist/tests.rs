//! The schedules checked without a communicator, on real plans of synthetic checkpoints.
