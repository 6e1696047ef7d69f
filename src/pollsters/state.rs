//! SKELETON: the runtime-control state file of the pollsters; to be written.
