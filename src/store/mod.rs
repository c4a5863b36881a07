//! Persistence: the database layer (`db`), schema migrations, and the queries of each capability.
pub mod db;
pub mod ledger;
pub mod packages;
pub mod runs;
pub mod schema;
pub mod settle;
pub mod subscriptions;
pub mod world;
