//! Pure billing rules: no IO, no wall clock. Every rule takes its instant as an argument.
pub mod model;
pub mod money;
pub mod settle;
pub mod zone;
