-- Approval plans (as server/store/migrations/0003.approval-plans.sql): each request pins the
-- plan it was created under (JSON) and its ticket id; each review records the plan's groups the
-- reviewer was in when reviewing.

ALTER TABLE requests ADD COLUMN plan TEXT NOT NULL DEFAULT '';
ALTER TABLE requests ADD COLUMN ticket TEXT NOT NULL DEFAULT '';
ALTER TABLE reviews ADD COLUMN groups TEXT NOT NULL DEFAULT '[]';
