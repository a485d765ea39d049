//! mirror (to be written).
