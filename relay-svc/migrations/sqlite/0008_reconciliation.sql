-- Reconciliation of deliveries no carrier confirmed: how many times each was
-- offered again, and when each message was last looked at (NULL: settled,
-- nothing left to reconcile).
ALTER TABLE deliveries ADD COLUMN offers BIGINT NOT NULL DEFAULT 0;
ALTER TABLE messages ADD COLUMN reconciled_at BIGINT;
UPDATE messages SET reconciled_at = accepted_at WHERE closed = FALSE;
CREATE INDEX messages_unsettled ON messages (reconciled_at) WHERE reconciled_at IS NOT NULL;
