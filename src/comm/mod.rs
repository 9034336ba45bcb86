//! Communicators (threads, MPI, NCCL), launcher detection and shared-tensor distribution.
//!
//! (Being built in issue 6.)
