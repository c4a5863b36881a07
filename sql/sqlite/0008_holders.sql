-- The database session doing a claimed run's work (PostgreSQL only: SQLite leaves these empty;
-- its writers are serialised by the database file's lock). Kept in both schemas so that they stay
-- alike.
ALTER TABLE job_runs ADD COLUMN holder_pid INTEGER;
ALTER TABLE job_runs ADD COLUMN holder_start INTEGER;
