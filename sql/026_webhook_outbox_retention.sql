-- Issue 15: delivered and given-up webhook events are deleted once older than
-- MB_WEBHOOK_RETENTION_DAYS (by the housekeeping, in batches): found by when they finished.
CREATE INDEX webhook_outbox_finished ON webhook_outbox (coalesce(delivered_at, failed_at))
    WHERE delivered_at IS NOT NULL OR failed_at IS NOT NULL;
