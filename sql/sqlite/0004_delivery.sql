-- Notification delivery: attempts with backoff; a delivery claims a notification by pushing
-- next_attempt_ms ahead, so two replicas never send the same one at the same time.
ALTER TABLE notifications ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE notifications ADD COLUMN next_attempt_ms INTEGER;
ALTER TABLE notifications ADD COLUMN delivered_at INTEGER;
ALTER TABLE notifications ADD COLUMN last_error TEXT;
CREATE INDEX notifications_delivery ON notifications(delivery, next_attempt_ms);
