-- The database session doing a claimed run's work (pg_backend_pid() and its backend_start in
-- microseconds since 1970), recorded when the work transaction begins. A runner that takes over a
-- run whose lease expired ends that session: a paused runner's open transaction would otherwise
-- keep its row locks for as long as the server waits on the paused client (inside a COPY, or in
-- the middle of a statement it was sending), and no timeout ends a wait of that kind.
ALTER TABLE job_runs ADD COLUMN holder_pid BIGINT;
ALTER TABLE job_runs ADD COLUMN holder_start BIGINT;
