//! Persistence: the database layer (`db`), schema migrations, and the queries of each capability.
pub mod db;
pub mod schema;
pub mod world;
pub mod ledger;
pub mod settle;
