//! Preference data: reading the Anthropic HH files and turning conversations into
//! (instruction, chosen, rejected) pairs.

pub mod hh;
