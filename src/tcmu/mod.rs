//! tcmu (to be written).
