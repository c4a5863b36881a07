//! Pure billing rules: no IO, no wall clock. Every rule takes its instant as an argument.
pub mod lifecycle;
pub mod model;
pub mod money;
pub mod packages;
pub mod prepaid;
pub mod settle;
pub mod zone;
