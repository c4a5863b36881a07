pub mod billing;
pub mod clock;
pub mod error;
pub mod fixture;
pub mod jobs;
pub mod store;
