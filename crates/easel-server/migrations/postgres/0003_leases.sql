-- Leases (issue 18): a running job is held by one worker, named by
-- `lease_owner`, until `lease_expires_at` (ms); the worker renews it while
-- it runs, and a job whose lease expired is claimed again.

ALTER TABLE generations ADD COLUMN lease_owner TEXT;
ALTER TABLE generations ADD COLUMN lease_expires_at BIGINT;
CREATE INDEX generations_lease ON generations (status, lease_expires_at);
