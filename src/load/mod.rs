//! The rank engine: loads one rank's planned tensors from storage.
//!
//! (Being built in issue 5.)
