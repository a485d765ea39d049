//! jobs (to be written).
