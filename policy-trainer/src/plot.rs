//! The accuracy/loss chart (in progress).
