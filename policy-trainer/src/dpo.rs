//! The DPO objective (in progress).
