-- Leases: a run is claimed by committing (owner, lease_until); the claim is renewed while the run
-- works and checked (owner, attempt) by the run's own transaction before it commits, so a replica
-- whose lease was taken over writes nothing.
ALTER TABLE job_runs ADD COLUMN attempt INTEGER NOT NULL DEFAULT 0;
