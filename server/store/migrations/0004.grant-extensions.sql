-- Extensions in place: how many times a grant's end moved, and the end it was first given.
-- depends: 0003.approval-plans

ALTER TABLE grants ADD COLUMN extensions INTEGER NOT NULL DEFAULT 0;
ALTER TABLE grants ADD COLUMN original_not_after INTEGER;

-- Requests: a scheduled start, a label selector for several hosts with the grants made for it
-- (JSON), the grant a request reused or extends.
ALTER TABLE requests ADD COLUMN start_at INTEGER;
ALTER TABLE requests ADD COLUMN selector TEXT NOT NULL DEFAULT '';
ALTER TABLE requests ADD COLUMN grant_ids TEXT NOT NULL DEFAULT '';
ALTER TABLE requests ADD COLUMN reused INTEGER NOT NULL DEFAULT 0;
ALTER TABLE requests ADD COLUMN extends_grant_id TEXT NOT NULL DEFAULT '';
